"""`open-clip-sigrel synth`: the command line of open_clip_sigrel.tools.synth."""
from open_clip_sigrel.tools.synth import configure_parser, run  # noqa: F401
