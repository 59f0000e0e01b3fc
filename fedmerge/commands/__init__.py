"""CLI subcommands, one module each (see fedmerge.cli)."""
