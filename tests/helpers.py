"""Shared small configurations and batches for the tests."""

from __future__ import annotations

import torch

from megapatch.config import ModelConfig, ParallelConfig, PrecisionConfig


def tiny_model(**overrides) -> ModelConfig:
    """A 4-layer Llama-style model with GQA, small enough for CPU tests."""
    cfg = dict(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=250,
        make_vocab_size_divisible_by=64,
        max_position_embeddings=256,
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


def fp32() -> PrecisionConfig:
    return PrecisionConfig(transformer_impl="local")


def parallel(tp=1, pp=1, vpp=None, sp=False) -> ParallelConfig:
    return ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=sp,
    )


def make_samples(n_samples: int, patch_size: int, patches: int, vocab: int, seed: int = 0):
    """Random token samples of K*T+K tokens split into inputs/labels (shift by K) and a mask.

    Some targets are masked (loss_mask 0) and tokens repeat inside patches, so token weighting
    and gradient accumulation of repeated targets are exercised.
    """
    g = torch.Generator().manual_seed(seed)
    k, t = patch_size, patches
    x = torch.randint(0, vocab, (n_samples, k * t + k), generator=g)
    x[:, 1::5] = x[:, 0::5][:, : x[:, 1::5].size(1)]  # repeated tokens
    tokens, labels = x[:, : k * t], x[:, k:]
    loss_mask = (torch.rand(n_samples, k * t, generator=g) > 0.15).float()
    position_ids = (torch.arange(k * t) // k).expand(n_samples, -1).contiguous()  # patch index
    return dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=position_ids)
