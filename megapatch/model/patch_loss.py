"""Multi-token vocab-parallel cross-entropy: one softmax per position, K targets.

The output at patch i is scored against every token of patch i+1 under ONE softmax:

    loss_{i,k} = logsumexp(z_i) - z_i[x_{(i+1)K+k}]        k = 0..K-1

Per-target-token losses are returned ([..., K]); the caller applies its loss mask and averages
over real tokens, which gives the paper's (1/K) sum_k CE(...) averaged over patches when no
token is masked.

Under tensor parallelism each rank holds a vocab shard of the logits. The forward pass does
one MAX all-reduce of [N] and one SUM all-reduce of [N, K+1] (the sum of exponentials and the K
target logits, each gathered from the rank that owns the target). Nothing logits-sized is
communicated and K copies of the logits are never made. The work happens in ONE fp32 buffer,
as in megatron's single-target loss: it holds the softmax after the forward pass and becomes
the gradient in the backward pass:

    dL/dz = softmax(z) * sum_k g_k  -  sum_k g_k * onehot(x_k)

(scatter-add, so a token repeated inside a patch accumulates its gradients). The caller's logits
are never modified, unless the caller declares them temporary (the model does: they die with
the loss), in which case fp32 logits themselves serve as that buffer.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.utils import VocabUtility
from torch import Tensor


class _MultiTokenVocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, group, reuse: bool) -> Tensor:  # noqa: ANN001
        vocab = logits.size(-1)
        k = targets.size(-1)
        lead = targets.shape[:-1]
        world = group.size() if group is not None else 1
        rank = group.rank() if group is not None else 0
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(vocab, rank, world)

        if logits.dtype != torch.float32:
            work = logits.float()  # a new buffer
        else:
            work = logits if reuse else logits.clone()
        # No views of ``work``: in-place ops on a view of an autograd input are refused.
        zmax = work.max(dim=-1).values
        if world > 1:
            torch.distributed.all_reduce(zmax, op=torch.distributed.ReduceOp.MAX, group=group)

        owned = (targets >= start) & (targets < end)
        local_t = (targets - start).masked_fill(~owned, 0)
        packed = torch.empty(*lead, k + 1, dtype=torch.float32, device=work.device)
        packed[..., 1:] = torch.gather(work, -1, local_t).masked_fill(~owned, 0.0)
        work.sub_(zmax.unsqueeze(-1)).exp_()
        torch.sum(work, dim=-1, out=packed[..., 0])
        if world > 1:
            torch.distributed.all_reduce(packed, group=group)
        sumexp = packed[..., 0]
        loss = (torch.log(sumexp) + zmax).unsqueeze(-1) - packed[..., 1:]
        work.div_(sumexp.unsqueeze(-1))  # softmax, kept for the backward pass

        ctx.save_for_backward(work, local_t, owned)
        ctx.out_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):  # noqa: ANN001, ANN205
        softmax, local_t, owned = ctx.saved_tensors
        g = grad_loss.float()
        grad = softmax  # becomes the gradient in place
        grad.mul_(g.sum(dim=-1, keepdim=True))
        grad.scatter_add_(-1, local_t, (-g).masked_fill(~owned, 0.0))
        return grad.to(ctx.out_dtype), None, None, None


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
            so fp32 logits may serve as the working buffer (overwritten), saving a
            logits-sized copy. Otherwise they are never modified.

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
