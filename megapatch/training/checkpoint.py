"""Checkpoints through megatron ``dist_checkpointing``: layout-independent, atomic, resumable.

On disk, under a checkpoint root (``RUN_DIR/checkpoints``)::

    iter_0000100/                      one complete checkpoint (a megatron dist checkpoint)
        megapatch.json                 what it is: step, stage, tokens, configs (see below)
        metadata.json, *.distcp, ...   megatron's files: model (+ optimizer, scheduler, RNG)
    latest_checkpointed_iteration.txt  "iter_0000100": the newest COMPLETE checkpoint (for tools)

A checkpoint is written into ``iter_XXXXXXX.partial`` and renamed only after every rank has
finished and ``megapatch.json`` is in place, then the ``latest`` file is replaced atomically:
a crash mid-save never leaves a partial checkpoint that looks complete. Model tensors are
stored by their global (unsharded) keys, so a checkpoint saved at one TP/PP/VPP layout loads
at any other; the optimizer state is saved ``fully_reshardable`` by default.

State-dict keys: ``model`` (or ``model0``, ``model1``, ... for virtual pipeline chunks),
``optimizer``, ``opt_param_scheduler``, ``rng_state`` (one sharded object per rank).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

CHECKPOINT_META = "megapatch.json"
LATEST_FILE = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1
OPTIMIZER_SHARDING = "fully_reshardable"


class CheckpointError(RuntimeError):
    """A missing, incomplete or incompatible checkpoint (the message names the path)."""


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"iter_{step:07d}"


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


def _rng_sharded_object() -> ShardedObject:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": _tracker_states(),
    }
    pp = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    dp = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    return ShardedObject(
        "rng_state", state, (pp_size, tp_size, dp_size), (pp, tp, dp), replica_id=0
    )


def _tracker_states() -> dict[str, torch.Tensor]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return get_cuda_rng_tracker().get_states()


def _restore_rng(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _state_dict(
    chunks: list[torch.nn.Module],
    optimizer: Any | None,
    scheduler: Any | None,
    with_rng: bool,
    is_loading: bool,
) -> dict[str, Any]:
    sd = model_sharded_state_dict(chunks)
    if optimizer is not None:
        if is_loading:
            _init_empty_distributed_optimizer_state(optimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(
            sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING}
        )
    if scheduler is not None:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        sd["rng_state"] = _rng_sharded_object()
    return sd


def _keep_torch_adam_step_on_load() -> None:
    """Two megatron-core 0.16.1 bugs, torch's Adam only (no Transformer Engine/apex), when a
    ``fully_reshardable`` distributed-optimizer state is loaded: (1) every per-parameter state
    key is copied, torch's per-parameter ``step`` included, from a saved state that has no
    ``step`` (KeyError('step')); (2) the step restored from the param groups just before is one
    tensor shared by all parameters, which torch's Adam then increments once per parameter
    (wrong bias correction from the first step after a resume). Give each parameter its own
    copy of the restored step."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_megapatch", False):
        return

    def set_states(self: Any, model_param: torch.nn.Parameter, tensors: dict) -> None:
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group, order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group]["params"][order]]
            if "step" in state:
                # megatron restored ONE step tensor shared by every parameter; torch's Adam
                # increments it in place per parameter, so each needs its own copy.
                state["step"] = state["step"].detach().clone()
                tensors = dict(tensors, step=state["step"])
        original(self, model_param, tensors)

    set_states._megapatch = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _init_empty_distributed_optimizer_state(optimizer: Any) -> None:
    """A fresh DistributedOptimizer has no state yet, and megatron cannot build the sharded
    state dict to load into without one (it reads the step count). Give it placeholder state
    (megatron's own helper: a zero-gradient step on the fp32 shards), which the load then
    replaces entirely: Adam moments, step and the fp32 main parameters."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    root: str,
    step: int,
    chunks: list[torch.nn.Module],
    meta: dict[str, Any],
    *,
    optimizer: Any | None = None,
    scheduler: Any | None = None,
    with_rng: bool = True,
    keep_last: int | None = None,
    hook: Callable[[str], None] | None = None,
) -> str:
    """Write a complete checkpoint of ``step`` under ``root`` (collective); return its path.

    Stop signals (SIGTERM/SIGUSR1) arriving meanwhile are held until the checkpoint is
    complete, in this process and in megatron's writer helpers (:mod:`.signals`); ``hook``
    (tests) is called with ``"commit"`` once the files are written, before the checkpoint is
    made complete.
    """
    from megapatch.runtime.signals import protect_checkpoint_writer, stop_signals_deferred

    with stop_signals_deferred():
        protect_checkpoint_writer()
        return _save(root, step, chunks, meta, optimizer, scheduler, with_rng, keep_last, hook)


def _save(root, step, chunks, meta, optimizer, scheduler, with_rng, keep_last, hook) -> str:  # noqa: ANN001
    rank = torch.distributed.get_rank()
    final = os.path.join(root, checkpoint_name(step))
    partial = final + ".partial"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(partial):
            shutil.rmtree(partial)  # this run's own, left by a crash: never complete
        os.makedirs(partial)
    torch.distributed.barrier()
    sd = _state_dict(chunks, optimizer, scheduler, with_rng, is_loading=False)
    error = None
    try:
        dist_checkpointing.save(sd, partial)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        error = err
    _raise_on_any_rank(error, root, step, partial)
    if hook is not None:
        hook("commit")
    if rank == 0:
        try:
            files = {
                name: os.path.getsize(os.path.join(partial, name))
                for name in sorted(os.listdir(partial))
            }
            body = dict(meta, format_version=FORMAT_VERSION, step=step, complete=True, files=files)
            _write_text_atomic(os.path.join(partial, CHECKPOINT_META), json.dumps(body, indent=2))
        except OSError as err:
            error = err
    _raise_on_any_rank(error, root, step, partial)
    if rank == 0:
        if os.path.exists(final):  # a damaged checkpoint of this step (resume fell back)
            aside = _set_aside(final)
            print(f"[checkpoint] {final} was damaged: kept as {aside}", flush=True)
        os.replace(partial, final)
        _write_text_atomic(os.path.join(root, LATEST_FILE), checkpoint_name(step) + "\n")
        if keep_last:
            _prune(root, keep_last)
    torch.distributed.barrier()
    return final


def _raise_on_any_rank(error: BaseException | None, root: str, step: int, partial: str) -> None:
    """Collective: when any rank failed to write, remove this save's partial checkpoint and
    raise CheckpointError on every rank (disk full named as such); the previous complete
    checkpoint and the latest pointer are untouched."""
    import errno

    failed = torch.tensor([0.0 if error is None else 1.0])
    if torch.cuda.is_available():
        failed = failed.cuda()
    torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if not failed.item():
        return
    text = "".join(str(e) for e in _chain(error)) if error is not None else ""
    full = any(getattr(e, "errno", None) == errno.ENOSPC for e in _chain(error)) or (
        "No space left on device" in text
    )
    # torch's zip writer reports a short write as "unexpected pos"; megatron's writer workers
    # may lose the errno on the way back: judge by the space left next to what was written.
    full = full or (error is not None and _disk_looks_full(partial))
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    previous = find_latest(root)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint"
    what = "the disk is full" if full else f"writing failed ({error or 'on another rank'})"
    raise CheckpointError(
        f"checkpoint of step {step} under {root} not written: {what}; its partial files were "
        f"removed and {kept}. "
        + ("Free space (or move --save), then " if full else "Fix the cause, then ")
        + "run the same command again to resume."
    ) from error


def _disk_looks_full(partial: str) -> bool:
    """True when the file system holding ``partial`` has less room left than the part of the
    checkpoint already written there (so the rest could not have fitted)."""
    try:
        free = shutil.disk_usage(partial).free
        written = sum(
            os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(partial) for f in names
        )
    except OSError:
        return False
    return free < max(written, 1 << 20)


def _chain(error: BaseException | None) -> list[BaseException]:
    out = []
    while error is not None and error not in out:
        out.append(error)
        error = error.__cause__ or error.__context__
    return out


def _set_aside(path: str) -> str:
    n, aside = 0, path + ".damaged"
    while os.path.exists(aside):
        n += 1
        aside = f"{path}.damaged{n}"
    os.replace(path, aside)
    return aside


def list_checkpoints(root: str) -> list[str]:
    """Checkpoints under ``root`` with a ``megapatch.json``, oldest first (see
    :func:`verify_checkpoint` for whether their files are whole)."""
    if not os.path.isdir(root):
        return []
    names = sorted(
        n
        for n in os.listdir(root)
        if n.startswith("iter_")
        and len(n) == len(checkpoint_name(0))
        and os.path.isfile(os.path.join(root, n, CHECKPOINT_META))
    )
    return [os.path.join(root, n) for n in names]


def verify_checkpoint(path: str) -> str | None:
    """None when ``path`` is a whole checkpoint, else what is wrong with it. Cheap: the files
    and sizes recorded at save time (older checkpoints: megatron's metadata files) exist."""
    try:
        meta = read_meta(path)
    except (CheckpointError, OSError, ValueError) as err:
        return str(err)
    files = meta.get("files")
    if files is None:  # saved before sizes were recorded
        files = {name: None for name in ("metadata.json", ".metadata", "common.pt")}
    for name, size in files.items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        if size is not None and os.path.getsize(full) != size:
            return f"{name} has {os.path.getsize(full):,} bytes, {size:,} were written"
    return None


def _prune(root: str, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` checkpoints; never the newest whole one."""
    found = list_checkpoints(root)
    whole = [p for p in found if verify_checkpoint(p) is None]
    keep = set(found[-keep_last:]) | set(whole[-1:])
    for path in found:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def find_latest(
    root: str, report: Callable[[str], None] | None = None, verify: bool = False
) -> str | None:
    """The newest complete checkpoint under ``root``, or None when there is none.

    With ``verify``, checkpoints whose files are not whole are passed over for the newest
    one that is (``report`` says which and why); nothing is deleted.
    """
    for path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path) if verify else None
        if problem is None:
            return path
        if report is not None:
            report(f"{path} is damaged ({problem}); passing over it (left in place)")
    return None


def read_meta(path: str) -> dict[str, Any]:
    """``megapatch.json`` of a checkpoint; a clear error when it is not a complete one."""
    meta_path = os.path.join(path, CHECKPOINT_META)
    if not os.path.isfile(meta_path):
        if os.path.isdir(path) and path.rstrip("/").endswith(".partial"):
            raise CheckpointError(f"{path} is an incomplete checkpoint (a save was interrupted)")
        raise CheckpointError(
            f"{path} is not a megapatch checkpoint (no {CHECKPOINT_META}); pass a directory "
            f"like RUN_DIR/checkpoints/iter_0000100, or the checkpoints root to take the latest"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION or not meta.get("complete"):
        raise CheckpointError(
            f"{meta_path}: unsupported format version {meta.get('format_version')} "
            f"(expected {FORMAT_VERSION}) or incomplete"
        )
    return meta


def load_checkpoint(
    path: str,
    chunks: list[torch.nn.Module],
    *,
    optimizer: Any | None = None,
    scheduler: Any | None = None,
    with_rng: bool = False,
    strict: bool = True,
) -> dict[str, Any]:
    """Load ``path`` (saved at any layout) into this rank's chunks (collective); return meta.

    Pass ``optimizer``/``scheduler``/``with_rng`` to resume them too (the RNG only at the
    layout it was saved at); model-only loading starts fresh optimizer state.
    """
    meta = read_meta(path)
    if optimizer is not None:
        _keep_torch_adam_step_on_load()
    sd = _state_dict(chunks, optimizer, scheduler, with_rng, is_loading=True)
    if scheduler is not None:
        sd.pop("opt_param_scheduler")
    loaded = dist_checkpointing.load(sd, path)
    _load_models(chunks, loaded, strict)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        common = dist_checkpointing.load_common_state_dict(path)
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if with_rng:
        _restore_rng(loaded["rng_state"])
    return meta


def save_model(chunks: list[torch.nn.Module], directory: str) -> None:
    """Save only the model weights into ``directory`` (collective; no metadata)."""
    if torch.distributed.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), directory)


def load_model(chunks: list[torch.nn.Module], directory: str, strict: bool = True) -> None:
    """Load weights saved at any layout (by ``save_model`` or ``save_checkpoint``)."""
    _load_models(
        chunks, dist_checkpointing.load(model_sharded_state_dict(chunks), directory), strict
    )


def _load_models(chunks: list[torch.nn.Module], loaded: dict[str, Any], strict: bool) -> None:
    """Put the ``model``/``model{i}`` entries of a loaded state dict into the chunks."""
    models = [unwrap_model(c) for c in chunks]
    keys = ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]
    for m, key in zip(models, keys):
        m.load_state_dict(loaded[key], strict=strict)
