"""Model weights through megatron ``dist_checkpointing`` (layout-independent on disk).

A checkpoint saved at one TP/PP/VPP layout loads at any other: tensors are stored by their
global (unsharded) keys, and megatron reshards on load.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from megatron.core import dist_checkpointing


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The megatron module under DDP / Float16Module wrappers."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """``{"model": ...}`` or, with virtual pipeline chunks, ``{"model0": ..., "model1": ...}``."""
    models = [unwrap_model(c) for c in chunks]
    if len(models) == 1:
        return {"model": models[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(models)}


def save_model(chunks: list[torch.nn.Module], directory: str) -> None:
    """Save the model weights of every rank's chunks into ``directory`` (collective)."""
    if torch.distributed.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), directory)


def load_model(chunks: list[torch.nn.Module], directory: str, strict: bool = True) -> None:
    """Load weights saved at any layout into this rank's chunks (collective)."""
    loaded = dist_checkpointing.load(model_sharded_state_dict(chunks), directory)
    models = [unwrap_model(c) for c in chunks]
    if len(models) == 1:
        models[0].load_state_dict(loaded["model"], strict=strict)
    else:
        for i, m in enumerate(models):
            m.load_state_dict(loaded[f"model{i}"], strict=strict)
