"""Reshard a megapatch checkpoint for another TP/PP/VPP layout (re-padding the vocabulary).

A dist checkpoint stores unsharded tensors, so it loads at any TP/PP/VPP as long as the
padded vocabulary is the same: ``make_vocab_size_divisible_by`` x TP decides it, so a TP
change can change the shapes of the embedding and output layer (and of their optimizer
state). Resharding writes a new checkpoint whose vocabulary is padded for the target TP and
whose ``megapatch.json`` records the target layout; everything else is copied as it is.

* Model weights: always. Padding rows that the target keeps stay as they were; new ones are
  the mean of the real rows (:func:`~megapatch.convert.weight_map.pad_vocab`).
* Optimizer state (``fully_reshardable``, per-parameter ``optimizer.state.<kind>.<key>``)
  and the scheduler: kept by default, so training resumes at the new layout; new padding rows
  get the weights' padding as master parameter and zero Adam moments. ``--no-optimizer`` drops
  them (a weights-only checkpoint).
* RNG states: dropped (they belong to the old ranks).

Streaming: one layer (all its tensors, weights and optimizer state) at a time.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megapatch.config import ConfigError, ParallelConfig
from megapatch.convert.common import (
    ConvertError,
    PeakMemory,
    barrier,
    broadcast_error,
    check_output,
    ensure_world,
    git_commit,
    is_converted_root,
    is_writer,
    layout_str,
    write_json,
    write_text,
)
from megapatch.convert.dist_io import DistCheckpoint, DistWriter, Request
from megapatch.convert.hf_config import model_config_from_meta
from megapatch.convert.weight_map import (
    LAYER_PREFIX,
    LlamaDims,
    MappingError,
    WeightMap,
    pad_vocab,
)
from megapatch.training.checkpoint import CHECKPOINT_META, LATEST_FILE, checkpoint_name

OPTIMIZER_PREFIX = "optimizer.state."
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass
class ReshardResult:
    """What a reshard wrote."""

    path: str
    root: str
    padded_vocab_size: tuple[int, int]  # (source, target)
    tensors: int
    with_optimizer: bool
    bytes: int
    seconds: float
    peak_rss: int | None


def _model_key(key: str) -> tuple[str, str | None]:
    """(model key, optimizer state kind or None) of a checkpoint tensor key."""
    if key.startswith(OPTIMIZER_PREFIX):
        kind, _, model_key = key[len(OPTIMIZER_PREFIX) :].partition(".")
        return model_key, kind
    return key, None


def _model_keys(dims: LlamaDims | None, ckpt: DistCheckpoint) -> set[str]:
    if dims is not None:
        return set(WeightMap(dims).megatron_shapes())
    return {
        k
        for k in ckpt.tensors
        if k.startswith((LAYER_PREFIX, "embedding.", "output_layer.", "decoder."))
    }


def reshard(
    load: str,
    save: str,
    parallel: ParallelConfig,
    *,
    with_optimizer: bool = True,
    force: bool = False,
    report: Callable[[str], None] | None = print,
) -> ReshardResult:
    """Write checkpoint ``load`` (dir or root) for layout ``parallel`` under root ``save``.

    Collective (see :mod:`megapatch.convert.dist_io`); checks run before any tensor is read.
    """
    t0 = time.perf_counter()
    say = report if (report and is_writer()) else (lambda _msg: None)
    ensure_world()
    err: BaseException | None = None
    try:
        ckpt = DistCheckpoint(load)
        meta = ckpt.meta
        source = os.path.join(ckpt.path, CHECKPOINT_META)
        cfg = model_config_from_meta(meta, source)
        try:
            parallel.validate(cfg)
        except ConfigError as e:
            raise ConvertError(f"target layout: {e}") from None
        vocab_key = VOCAB_KEYS[0]
        if vocab_key not in ckpt.tensors:
            raise ConvertError(f"{ckpt.path} has no tensor {vocab_key}; not a GPT checkpoint")
        old_vp = ckpt.shape(vocab_key)[0]
        new_vp = cfg.padded_vocab_size(parallel.tensor_model_parallel_size)
        try:
            dims: LlamaDims | None = LlamaDims.from_model_config(cfg, old_vp)
        except MappingError:
            dims = None  # not Llama: copy generically, still re-padding the vocabulary
        model_keys = _model_keys(dims, ckpt)
        missing = sorted(model_keys - set(ckpt.tensors))
        if missing:
            raise ConvertError(
                f"{ckpt.path} lacks tensor {missing[0]} (and {len(missing) - 1} more); the "
                "checkpoint is incomplete"
            )
        plan: list[str] = []
        dropped: list[str] = []
        for key in ckpt.tensors:
            model_key, kind = _model_key(key)
            if kind is None and key in model_keys:
                plan.append(key)
            elif kind is not None and model_key in model_keys:
                (plan if with_optimizer else dropped).append(key)
            elif key.startswith("optimizer.") and not with_optimizer:
                dropped.append(key)
            else:
                raise ConvertError(
                    f"{ckpt.path}: tensor {key} is neither a model weight nor per-parameter "
                    "optimizer state (an optimizer saved dp_reshardable cannot be resharded); "
                    "pass --no-optimizer to keep the weights only"
                )
        common = ckpt.common() if with_optimizer else {}
        opt_common = common.get("optimizer", {})
        has_optimizer = any(_model_key(k)[1] for k in plan)
        if has_optimizer and opt_common.get("param_state_sharding_type") not in (
            None,
            "fully_reshardable",
        ):
            raise ConvertError(
                f"{ckpt.path}: optimizer state is {opt_common.get('param_state_sharding_type')}"
                ", which only loads at its own layout; pass --no-optimizer"
            )
        for key in plan:
            if _model_key(key)[0].startswith(LAYER_PREFIX) and ckpt.shape(key)[0] != cfg.num_layers:
                raise ConvertError(
                    f"{ckpt.path}: {key} has {ckpt.shape(key)[0]} layers, but {source} says "
                    f"num_layers {cfg.num_layers}"
                )
        extra_states = [k for k in ckpt.object_keys() if "._extra_state/" in k]
        if is_writer():
            check_output(
                save,
                force,
                "--save root",
                inputs=(load, ckpt.path),
                earlier_output=is_converted_root,
            )
    except (ConvertError, OSError) as e:
        err = e
    broadcast_error(err)

    step = int(meta.get("step", 0))
    final = os.path.join(save, checkpoint_name(step))
    partial = final + ".partial"
    if is_writer():
        if os.path.exists(partial):
            shutil.rmtree(partial)
        os.makedirs(partial)
        say(
            f"resharding {ckpt.path} ({layout_str(meta.get('parallel'))}, padded vocab "
            f"{old_vp}) -> {final} ({layout_str(dataclasses.asdict(parallel))}, padded vocab "
            f"{new_vp}): {len(plan)} tensors"
            + (", optimizer state kept" if has_optimizer else ", weights only")
        )
    layers = cfg.num_layers
    stacked = [k for k in plan if _model_key(k)[0].startswith(LAYER_PREFIX)]
    whole = [k for k in plan if k not in stacked]
    writer = DistWriter(partial + ".staging")
    vocab = cfg.vocab_size
    # Non-layer tensors one at a time (the vocabulary tables are the largest), then layers.
    for key in whole:
        loaded = ckpt.load([Request(key)])
        if is_writer():
            t = loaded[Request(key)]
            model_key, kind = _model_key(key)
            if model_key in VOCAB_KEYS and new_vp != old_vp:
                t = _repad(t, vocab, new_vp, kind)
            writer.add(key, t)
        del loaded
    for i in range(layers):
        loaded = ckpt.load([Request(k, i) for k in stacked])
        if is_writer():
            for k in stacked:
                writer.add(k, loaded[Request(k, i)], i, layers)
        del loaded
    objects = ckpt.load_objects(extra_states)
    if is_writer():
        for unique, value in objects.items():
            shape, offset = ckpt.object_keys()[unique]
            writer.add_object(unique.rsplit("/shard_", 1)[0], value, shape, offset)
    writer.save(partial, common=common)
    if is_writer():
        new_meta = copy.deepcopy(meta)
        new_meta.update(
            parallel=dataclasses.asdict(parallel),
            padded_vocab_size=new_vp,
            resharded_from={
                "path": os.path.abspath(ckpt.path),
                "parallel": meta.get("parallel"),
                "padded_vocab_size": old_vp,
                "git_commit": git_commit(),
            },
        )
        # RNG states are not carried over: without a recorded world size the training loop
        # does not try to restore them on resume.
        new_meta.pop("world_size", None)
        if not has_optimizer:
            new_meta["model_only"] = True
        write_json(os.path.join(partial, CHECKPOINT_META), new_meta)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        write_text(os.path.join(save, LATEST_FILE), checkpoint_name(step) + "\n")
        say(f"wrote {final}")
    barrier()
    return ReshardResult(
        path=final,
        root=save,
        padded_vocab_size=(old_vp, new_vp),
        tensors=len(plan),
        with_optimizer=has_optimizer,
        bytes=writer.bytes,
        seconds=time.perf_counter() - t0,
        peak_rss=PeakMemory.peak_bytes(),
    )


def _repad(t: torch.Tensor, vocab: int, padded: int, kind: str | None) -> torch.Tensor:
    """Re-pad a [Vp, h] vocabulary table (weights/master weights: mean rows; moments: 0)."""
    if kind in (None, "param", "fp32_param"):
        return pad_vocab(t, vocab, padded)
    out = torch.zeros((padded, *t.shape[1:]), dtype=t.dtype)
    keep = min(padded, t.shape[0])
    out[:keep] = t[:keep]
    return out
