"""Tools built on the core: the synthetic experiments, the constellation bounds, the digits data, the
demo, checkpoint evaluation and plots. Library code only: their command lines are open_clip_sigrel.cli.<name>."""
