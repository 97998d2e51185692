"""megapatch: patch-level training for GPT models on Megatron-Core."""

__version__ = "0.1.0"
