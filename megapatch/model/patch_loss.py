"""Multi-token vocab-parallel cross-entropy: one softmax per position, K targets.

The output at patch i is scored against every token of patch i+1 under ONE softmax:

    loss_{i,k} = logsumexp(z_i) - z_i[x_{(i+1)K+k}]        k = 0..K-1

Per-target-token losses are returned ([..., K]); the caller applies its loss mask and averages
over real tokens, which gives the paper's (1/K) sum_k CE(...) averaged over patches when no
token is masked.

Under tensor parallelism each rank holds a vocab shard of the logits. The forward pass does
one MAX all-reduce of [N] and one SUM all-reduce of [N, K+1] (the sum of exponentials and the K
target logits, each gathered from the rank that owns the target). Nothing logits-sized is
communicated and K copies of the logits are never made; the caller's logits (fp32 or bf16) are
never modified. The backward pass recomputes the softmax chunk by chunk from the saved logits:

    dL/dz = softmax(z) * sum_k g_k  -  sum_k g_k * onehot(x_k)

(scatter-add, so a token repeated inside a patch accumulates its gradients). Work in fp32
happens in row chunks, which bounds the temporary memory for bf16 logits.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.utils import VocabUtility
from torch import Tensor

_CHUNK_ELEMENTS = 1 << 24  # rows per chunk = this / vocab shard (64 MiB of fp32 temporaries)


def _rows_per_chunk(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


class _MultiTokenVocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, group, reuse: bool) -> Tensor:  # noqa: ANN001
        vocab = logits.size(-1)
        k = targets.size(-1)
        lead = targets.shape[:-1]
        world = group.size() if group is not None else 1
        rank = group.rank() if group is not None else 0
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(vocab, rank, world)

        z = logits.reshape(-1, vocab)
        t = targets.reshape(-1, k)
        zmax = z.max(dim=-1).values.float()
        if world > 1:
            torch.distributed.all_reduce(zmax, op=torch.distributed.ReduceOp.MAX, group=group)

        owned = (t >= start) & (t < end)
        local_t = (t - start).masked_fill(~owned, 0)
        packed = torch.empty(z.size(0), k + 1, dtype=torch.float32, device=z.device)
        packed[:, 1:] = torch.gather(z, 1, local_t).float().masked_fill(~owned, 0.0)
        step = _rows_per_chunk(vocab)
        for s in range(0, z.size(0), step):
            e = s + step
            packed[s:e, 0] = torch.exp(z[s:e].float() - zmax[s:e, None]).sum(dim=-1)
        if world > 1:
            torch.distributed.all_reduce(packed, group=group)
        sumexp = packed[:, 0]
        loss = (torch.log(sumexp) + zmax)[:, None] - packed[:, 1:]

        ctx.save_for_backward(logits, zmax, sumexp, local_t, owned)
        ctx.reuse = reuse
        return loss.view(*lead, k)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):  # noqa: ANN001, ANN205
        logits, zmax, sumexp, local_t, owned = ctx.saved_tensors
        vocab = logits.size(-1)
        k = local_t.size(-1)
        z = logits.reshape(-1, vocab)
        g = grad_loss.reshape(-1, k).float()
        scale = g.sum(dim=-1) / sumexp  # softmax weight: sum_k g_k / sum exp
        minus_g = (-g).masked_fill(~owned, 0.0)
        # The gradient goes into the logits' own storage when the caller hands them over
        # (they are dead once the loss is computed), else into a new buffer.
        grad = z if ctx.reuse else torch.empty_like(z)
        step = _rows_per_chunk(vocab)
        for s in range(0, z.size(0), step):
            e = s + step
            if z.dtype == torch.float32:
                out = grad[s:e]
                torch.sub(z[s:e], zmax[s:e, None], out=out)
                out.exp_().mul_(scale[s:e, None])
                out.scatter_add_(1, local_t[s:e], minus_g[s:e])
            else:
                chunk = torch.exp(z[s:e].float() - zmax[s:e, None]).mul_(scale[s:e, None])
                chunk.scatter_add_(1, local_t[s:e], minus_g[s:e])
                grad[s:e].copy_(chunk)
        return grad.view_as(logits), None, None, None


def vocab_parallel_multi_token_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    group: torch.distributed.ProcessGroup | None = None,
    logits_are_temporary: bool = False,
) -> Tensor:
    """Per-target cross-entropy of K targets under one softmax, vocab-parallel over ``group``.

    Args:
        logits: [..., V/tp] this rank's vocab shard of the logits (any float dtype).
        targets: [..., K] global token ids (int64); K=1 is ordinary next-token CE.
        group: the tensor-parallel group (None or size 1: no communication).
        logits_are_temporary: the caller drops ``logits`` after this call (as the model does),
            so the backward pass may write the gradient into their storage, saving a
            logits-sized buffer. The forward pass never modifies them either way.

    Returns:
        [..., K] fp32 losses, ``loss[..., k] = logsumexp(logits) - logits[targets[..., k]]``.
    """
    if targets.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"targets {tuple(targets.shape)} must be logits' leading shape "
            f"{tuple(logits.shape[:-1])} plus a trailing K dimension"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    return _MultiTokenVocabParallelCE.apply(logits, targets.long(), group, logits_are_temporary)
