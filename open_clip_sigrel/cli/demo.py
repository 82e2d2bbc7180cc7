"""`open-clip-sigrel demo`: the command line of open_clip_sigrel.tools.demo."""
from open_clip_sigrel.tools.demo import configure_parser, run  # noqa: F401
