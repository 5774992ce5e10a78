"""Handlers of the ``tpmsigner`` subcommands, one module per concern."""
