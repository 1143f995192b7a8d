"""The `tower-gateway` command and its subcommands."""
