"""Commands: one Python function per CLI subcommand, of the same name."""
