"""One training step on megatron-core: DDP wrapping, the optimizer, forward/backward, update.

The loss is the token-weighted mean over every real (unmasked) target token of the global
batch, at any patch size: each micro-batch returns (sum of masked per-token losses, token
count) and ``finalize_model_grads`` divides the gradients by the global token count
(``calculate_per_token_loss``), across micro-batches, pipeline stages and data-parallel ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

Batch = dict[str, Tensor]


def wrap_with_ddp(
    chunks: list[torch.nn.Module],
    config: TransformerConfig,
    *,
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
    bucket_size: int | None = None,
) -> list[DistributedDataParallel]:
    """Wrap model chunks in megatron DDP and install the schedule hooks on ``config``."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
        average_in_collective=False,
    )
    wrapped = [
        # Bucketing only for the first chunk, as Megatron-LM does with interleaved pipelines.
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [w.no_sync for w in wrapped]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if overlap_grad_reduce:
        sync = [w.start_grad_sync for w in wrapped]
        config.grad_sync_func = sync[0] if len(sync) == 1 else sync
    if overlap_param_gather:
        gather = [w.start_param_sync for w in wrapped]
        config.param_sync_func = gather[0] if len(gather) == 1 else gather
    return wrapped


def build_optimizer(
    chunks: list[DistributedDataParallel], optimizer_config: OptimizerConfig
) -> MegatronOptimizer:
    """megatron-core's optimizer (plain or distributed, per the DDP config) over the chunks.

    Without Transformer Engine/apex megatron falls back to torch's Adam, which on CPU tensors
    defaults to its per-parameter Python loop; the multi-tensor (foreach) path computes the
    same update with far less overhead per step.
    """
    optimizer = get_megatron_optimizer(optimizer_config, chunks)
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for group in inner.param_groups:
                if not group.get("fused"):
                    group["foreach"] = True
    return optimizer


def build_scheduler(
    optimizer: MegatronOptimizer,
    *,
    lr: float,
    min_lr: float = 0.0,
    warmup_steps: int = 0,
    decay_steps: int = 1,
    decay_style: str = "cosine",
    weight_decay: float = 0.0,
    override: bool = False,
) -> OptimizerParamScheduler:
    """megatron's LR/weight-decay scheduler (warmup then decay).

    It also applies each parameter group's ``wd_mult`` (no weight decay on biases and norms):
    megatron's optimizer leaves that to the scheduler, so a step without one decays every
    parameter. ``override``: a loaded state restores the position (step count) only, not the
    settings (a re-planned resume).
    """
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup_steps else lr,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=max(decay_steps, warmup_steps + 1),
        lr_decay_style=decay_style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=max(decay_steps, 1),
        wd_incr_style="constant",
        override_opt_param_scheduler=override,
        use_checkpoint_opt_param_scheduler=not override,
    )


def _loss_func(loss_mask: Tensor, output: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    mask = loss_mask.reshape(-1).to(torch.float32)
    loss_sum = (output.reshape(-1).float() * mask).sum()
    tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), tokens.detach().float()])
    return loss_sum, tokens, {"lm loss": report}


def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module) -> tuple[Tensor, Any]:
    """megatron schedule callback: one micro-batch through one model chunk."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch.get("position_ids"), None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def _reduce_report(reports: list[dict[str, Tensor]]) -> tuple[float, int]:
    """(loss sum, token count) of the global batch, identical on every rank."""
    total = torch.zeros(2, dtype=torch.float64)
    for r in reports:
        total += r["lm loss"].double().cpu()
    if torch.cuda.is_available():
        total = total.cuda()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        # Only the last stage computed losses; the others contribute zeros.
        torch.distributed.all_reduce(
            total, group=parallel_state.get_pipeline_model_parallel_group()
        )
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return float(total[0]), int(round(float(total[1])))


@dataclass
class StepResult:
    """What one step measured (identical on every rank)."""

    loss: float  # token-weighted mean loss over the global batch
    tokens: int  # real target tokens in the global batch
    grad_norm: float | None = None
    update_successful: bool = True
    finite: bool = True  # loss and gradient norm finite (else the update was not applied)


def forward_backward(
    chunks: list[torch.nn.Module],
    data_iterators: list[Iterator[Batch]],
    *,
    num_microbatches: int,
    micro_batch_size: int,
    seq_positions: int,
    forward_only: bool = False,
) -> StepResult:
    """All micro-batches of one global batch through megatron's pipeline schedule.

    ``seq_positions`` is the number of positions per sample the pipeline carries: tokens at
    K=1, patches (tokens / K) in the patch stage.
    """
    fb = get_forward_backward_func()
    reports = fb(
        forward_step_func=forward_step,
        data_iterator=data_iterators if len(chunks) > 1 else data_iterators[0],
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_positions,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    loss_sum, tokens = _reduce_report(reports)
    return StepResult(loss=loss_sum / max(tokens, 1), tokens=tokens)


def train_step(
    chunks: list[DistributedDataParallel],
    optimizer: MegatronOptimizer,
    data_iterators: list[Iterator[Batch]],
    *,
    num_microbatches: int,
    micro_batch_size: int,
    seq_positions: int,
    check_finite: bool = True,
) -> StepResult:
    """Zero grads, forward/backward over the global batch, optimizer step.

    The update is megatron's optimizer step taken apart at its public seams (as its
    ``ChainedOptimizer.step`` does: ``prepare_grads``, ``get_grad_norm``,
    ``clip_grad_by_total_norm_fp32``, ``step_with_ready_grads``), so that with
    ``check_finite`` a non-finite loss or gradient norm (identical on every rank) is caught
    before any weight or optimizer state changes: the update is then skipped
    (``finite=False``) and the caller decides whether to go on.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    result = forward_backward(
        chunks,
        data_iterators,
        num_microbatches=num_microbatches,
        micro_batch_size=micro_batch_size,
        seq_positions=seq_positions,
    )
    if optimizer.prepare_grads():  # megatron's own overflow check (fp16 loss scaling)
        result.update_successful = False
        return result
    grad_norm = float(optimizer.get_grad_norm())
    result.grad_norm = grad_norm
    if check_finite and not (math.isfinite(grad_norm) and math.isfinite(result.loss)):
        result.update_successful, result.finite = False, False
        return result
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = [] if getattr(opt, "is_stub_optimizer", False) else opt.get_parameters()
        if params and opt.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(
                params,
                max_norm=opt.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    result.update_successful = bool(optimizer.step_with_ready_grads())
    return result


def parameters_finite(chunks: list[torch.nn.Module]) -> bool:
    """Whether every parameter of every rank is finite (collective)."""
    bad = torch.zeros(1)
    for chunk in chunks:
        for p in chunk.parameters():
            if not bool(torch.isfinite(p.detach()).all()):
                bad.fill_(1.0)
                break
    if torch.cuda.is_available():
        bad = bad.cuda()
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return not bool(bad.item())
