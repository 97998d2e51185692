"""Patch-level GPT on megatron-core: the model, its patch embedding and its loss."""

from megapatch.model.gpt import PatchGPTModel, build_model, set_patch_size, transformer_config
from megapatch.model.patch_loss import vocab_parallel_multi_token_cross_entropy

__all__ = [
    "PatchGPTModel",
    "build_model",
    "set_patch_size",
    "transformer_config",
    "vocab_parallel_multi_token_cross_entropy",
]
