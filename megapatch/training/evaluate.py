"""Validation: token-level loss and perplexity in every stage (comparable across stages), and
in the patch stage also the patch-level loss on the same validation text.

Validation samples are token-level windows of T+1 tokens. The patch-level loss reuses them: the
first P*K tokens are the input (P patches) and the K tokens after each patch the targets, all
inside the window, with P the largest number of patches that fits (P*K + K <= T + 1) and that
the layout can run: a multiple of the TP size under sequence parallelism (the sequence is split
over TP ranks) and of 16 under FP8 (:func:`patch_eval_positions`; the dry run checks it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from megatron.core import parallel_state

from megapatch.model import set_patch_size
from megapatch.training.step import Batch, forward_backward


def position_alignment(tp: int, sequence_parallel: bool, fp8: bool) -> int:
    """The multiple that positions per sample must be: the TP size under sequence parallelism
    (the sequence is split over TP ranks), times 16 under FP8 (each rank's FP8 GEMMs need a
    multiple of 16 positions; the model checks the same, ``specs.check_fp8_positions``)."""
    split = tp if sequence_parallel else 1
    return split * 16 if fp8 else split


def patch_eval_positions(seq_length: int, k: int, align: int = 1) -> int:
    """Patches per validation window of ``seq_length`` + 1 tokens at patch size ``k``."""
    fits = (seq_length + 1 - k) // k
    return fits // align * align


def _patch_view(batch: Batch, k: int, patches: int) -> Batch:
    n = patches * k
    return {
        "tokens": batch["tokens"][:, :n],
        "labels": batch["labels"][:, k - 1 : n + k - 1],
        "loss_mask": batch["loss_mask"][:, k - 1 : n + k - 1],
        "position_ids": (torch.arange(n) // k).expand(batch["tokens"].size(0), -1),
    }


def _micro_batches(dataset, micro_batch_size: int, k: int, patches: int) -> list[Batch]:  # noqa: ANN001
    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    per_rank = len(dataset) // dp
    idx = list(range(rank * per_rank, (rank + 1) * per_rank))
    out = []
    for i in range(0, len(idx) - micro_batch_size + 1, micro_batch_size):
        items = [dataset[j] for j in idx[i : i + micro_batch_size]]
        batch = {key: torch.stack([it[key] for it in items]) for key in items[0]}
        out.append(_patch_view(batch, k, patches) if k > 1 else batch)
    return out


def _loss(chunks: list, dataset, micro_batch_size: int, k: int) -> float:  # noqa: ANN001
    from megapatch.training.checkpoint import unwrap_model

    cfg = unwrap_model(chunks[0]).config
    align = position_alignment(cfg.tensor_model_parallel_size, cfg.sequence_parallel, bool(cfg.fp8))
    patches = patch_eval_positions(dataset.length, k, align) if k > 1 else 0
    micro = _micro_batches(dataset, micro_batch_size, k, patches)
    iters: list[Iterator[Batch]] = [iter(list(micro)) for _ in chunks]
    positions = micro[0]["tokens"].size(1) // k
    set_patch_size(chunks, k)
    for c in chunks:
        c.eval()
    with torch.no_grad():
        res = forward_backward(
            chunks,
            iters,
            num_microbatches=len(micro),
            micro_batch_size=micro_batch_size,
            seq_positions=positions,
            forward_only=True,
        )
    for c in chunks:
        c.train()
    return res.loss


def evaluate(chunks: list, dataset, micro_batch_size: int, train_patch_size: int) -> dict:  # noqa: ANN001
    """Token-level validation loss/perplexity (+ patch-level loss when ``train_patch_size`` > 1).

    Leaves the model at ``train_patch_size``.
    """
    out = {}
    try:
        val = _loss(chunks, dataset, micro_batch_size, 1)
        out.update(val_loss=val, val_ppl=math.exp(min(val, 50.0)))
        if train_patch_size > 1:
            out["val_patch_loss"] = _loss(chunks, dataset, micro_batch_size, train_patch_size)
    finally:
        set_patch_size(chunks, train_patch_size)
    return out
