"""Tools built on the core: the synthetic experiments, the constellation bounds, the digits data, the
demo, checkpoint evaluation and plots. Each module's ``configure_parser`` / ``run`` back one
``open-clip-sigrel`` subcommand."""
