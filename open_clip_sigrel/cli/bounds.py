"""`open-clip-sigrel bounds`: the command line of open_clip_sigrel.tools.bounds."""
from open_clip_sigrel.tools.bounds import configure_parser, run  # noqa: F401
