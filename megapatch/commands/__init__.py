"""Sub-commands of the `megapatch` CLI."""
