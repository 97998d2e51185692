"""Process-level runtime: torch.distributed, megatron parallel state, CPU shims."""
