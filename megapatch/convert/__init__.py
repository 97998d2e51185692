"""Checkpoint tools: Megatron dist checkpoints <-> Hugging Face Llama, resharding, inspection."""
