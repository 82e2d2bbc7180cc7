"""`open-clip-sigrel data`: the command line of open_clip_sigrel.tools.data."""
from open_clip_sigrel.tools.data import configure_parser, run  # noqa: F401
