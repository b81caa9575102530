"""The ``cspine`` commands, one module per family, each with ``register(subparsers, settings)`` adding its
subcommands with defaults from ``settings`` (cspine.config.Settings); ``cspine.cli`` assembles them.
``client_args`` is no command: it holds the flags and helpers the client commands share."""
