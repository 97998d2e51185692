"""Measure the memory terms of a real ``PatchGPTModel`` (CPU or GPU), for the estimator's tests
and ``benchmarks/bench_memory.py``.

* Activations: every tensor autograd saves for the backward pass during one forward, caught
  with ``torch.autograd.graph.saved_tensors_hooks`` and counted once per storage (a view keeps
  its whole storage alive, so the storage is what costs memory); parameters are left out.
  Each storage is attributed to the region that saved it first: ``embedding``, ``layers``
  (the transformer block, checkpoint inputs included), ``output`` (final norm and output layer)
  and ``loss``.
* Model state: the parameters themselves, megatron DDP's gradient buffers, and the optimizer's
  fp32 master weights (those that are not the model's own tensors) and Adam moments after one
  real step.

megatron-core's parallel state must be initialised for the layout by the caller.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def measure_activations(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes saved for backward by one forward of ``model`` on ``batch``, by region.

    ``model`` is one ``PatchGPTModel`` chunk (unwrapped); ``batch`` has ``tokens``,
    ``position_ids`` and ``labels`` of shape [b, K*T]. The forward is followed by a backward of
    the summed loss so that nothing stays alive afterwards.
    """
    region = ["other"]
    seen: set[int] = set()
    params = {_storage_key(p) for p in model.parameters()}
    totals: dict[str, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in seen and key not in params and key != 0:
            seen.add(key)
            totals[region[0]] = totals.get(region[0], 0) + t.untyped_storage().nbytes()
        return t

    def setter(name: str) -> Any:
        def hook(*_: Any) -> None:
            region[0] = name

        return hook

    handles = []
    if getattr(model, "pre_process", False):
        handles.append(model.embedding.register_forward_pre_hook(setter("embedding")))
    handles.append(model.decoder.register_forward_pre_hook(setter("layers")))
    if getattr(model, "post_process", False):
        final = getattr(model.decoder, "final_layernorm", None)
        if final is not None:
            handles.append(final.register_forward_pre_hook(setter("output")))
        handles.append(model.output_layer.register_forward_hook(setter("loss")))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        out.float().sum().backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return totals


def measure_model_state(chunks: list[torch.nn.Module], optimizer: Any) -> dict[str, int]:
    """Bytes of weights, gradient buffers and optimizer state (after at least one step).

    ``chunks`` are megatron-DDP-wrapped model chunks, ``optimizer`` megatron's optimizer.
    """
    weights, model_keys = 0, set()
    for chunk in chunks:
        for p in chunk.parameters():
            if id(p) in model_keys:
                continue
            model_keys.add(id(p))
            weights += p.numel() * p.element_size()
    storages = {_storage_key(p) for c in chunks for p in c.parameters()}
    grads = 0
    for chunk in chunks:
        for buf in list(chunk.buffers) + list(getattr(chunk, "expert_parallel_buffers", [])):
            grads += buf.grad_data.numel() * buf.grad_data.element_size()
    opt_bytes = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if _storage_key(p) not in storages:  # an fp32 master copy (or shard)
                    opt_bytes += p.numel() * p.element_size()
                for v in inner.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.numel() > 1:
                        opt_bytes += v.numel() * v.element_size()
    return {"weights": weights, "gradients": grads, "optimizer": opt_bytes}


def sample_batch(
    micro_batch: int, patch_size: int, positions: int, vocab: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random [b, K*T] tokens, labels (shifted by one patch), patch-index positions, mask."""
    g = torch.Generator().manual_seed(seed)
    k, t = patch_size, positions
    x = torch.randint(0, vocab, (micro_batch, k * t + k), generator=g)
    return dict(
        tokens=x[:, : k * t].contiguous(),
        labels=x[:, k:].contiguous(),
        loss_mask=torch.ones(micro_batch, k * t),
        position_ids=(torch.arange(k * t) // k).expand(micro_batch, -1).contiguous(),
    )


def one_training_step(
    chunks: list[torch.nn.Module],
    optimizer: Any,
    batches: Iterator[dict[str, torch.Tensor]],
    positions: int,
    micro_batch: int,
    num_microbatches: int = 1,
) -> None:
    """One real step through megapatch's training step (allocates the optimizer state)."""
    from megapatch.training.step import train_step

    train_step(
        chunks,
        optimizer,
        [batches],
        num_microbatches=num_microbatches,
        micro_batch_size=micro_batch,
        seq_positions=positions,
    )
