"""`open-clip-sigrel evaluate`: the command line of open_clip_sigrel.tools.evaluate."""
from open_clip_sigrel.tools.evaluate import configure_parser, run  # noqa: F401
