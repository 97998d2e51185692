"""Shared pieces of the checkpoint tools: errors, the process world, paths, sizes, dtypes."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ConvertError(ValueError):
    """Bad input to a checkpoint tool; the message names the file or field and the fix."""


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` of a torch dtype."""
    if dtype not in DTYPE_NAMES:
        raise ConvertError(f"unsupported tensor dtype {dtype}; expected fp32, bf16 or fp16")
    return DTYPE_NAMES[dtype]


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB``, ``1000`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ConvertError(f"--max-shard-size {text!r}: expected a size like 5GB or 500MB")
    base = 1024 if m[3] else 1000
    power = " KMGT".index(m[2].upper() or " ")
    return int(float(m[1]) * base**power)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def layout_str(parallel: dict[str, Any] | None) -> str:
    """``TP2 PP2`` (``VPP2`` when interleaved) from a recorded ParallelConfig dict."""
    par = parallel or {}
    tp = par.get("tensor_model_parallel_size", "?")
    pp = par.get("pipeline_model_parallel_size", "?")
    vpp = par.get("virtual_pipeline_model_parallel_size")
    return f"TP{tp} PP{pp}" + (f" VPP{vpp}" if vpp else "")


def ensure_world() -> tuple[int, int]:
    """A torch.distributed world for megatron's dist_checkpointing (one process when alone).

    The tools are collective: run alone they form a one-rank gloo world; inside an existing
    world every rank must call them (rank 0 does the reading and writing).
    """
    from megapatch.runtime import distributed

    return distributed.init_process_group()


def is_writer() -> bool:
    """Whether this rank writes files (rank 0)."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def barrier() -> None:
    """Barrier over the default group (no-op without a world)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def broadcast_error(err: BaseException | None) -> None:
    """Raise on every rank when any rank failed a check (collective)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        if err is not None:
            raise err
        return
    msgs: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(msgs, None if err is None else (type(err), str(err)))
    for m in msgs:
        if m is not None:
            if err is not None:
                raise err
            raise m[0](m[1])


def check_output(
    path: str,
    force: bool,
    what: str,
    inputs: tuple[str, ...] = (),
    earlier_output: Callable[[str], bool] | None = None,
) -> None:
    """Refuse an output that would overwrite or delete anything but this command's own earlier
    output (before any expensive work).

    * the output may not be, contain or lie inside any of ``inputs`` (``--force`` or not);
    * an existing non-empty output needs ``--force``, and even then is replaced only when
      ``earlier_output(path)`` recognises it as an earlier output of the same command.
    """
    real = os.path.realpath(path)
    for src in inputs:
        other = os.path.realpath(src)
        if real == other or other.startswith(real + os.sep) or real.startswith(other + os.sep):
            raise ConvertError(
                f"{what} {path} overlaps the input {src}: a command never writes over, or "
                "deletes, what it reads; choose another output"
            )
    if not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path)):
        return
    if not force:
        raise ConvertError(f"{path} exists; pass --force to overwrite it, or choose another {what}")
    if earlier_output is not None and not earlier_output(path):
        raise ConvertError(
            f"{path} exists and is not an earlier output of this command; --force only replaces "
            f"such an output: choose another {what}"
        )


def is_converted_root(root: str) -> bool:
    """A checkpoint root holding only checkpoints written by ``convert import``/``reshard``
    (never a training run's checkpoints)."""
    if not os.path.isdir(root):
        return False
    for name in os.listdir(root):
        if name in ("latest_checkpointed_iteration.txt", "tokenizer.model"):
            continue
        meta = os.path.join(root, name, "megapatch.json")
        if not (name.startswith("iter_") and os.path.isfile(meta)):
            return False
        try:
            with open(meta) as f:
                body = json.load(f)
        except (OSError, json.JSONDecodeError):
            return False
        if not ({"imported_from", "resharded_from"} & set(body)):
            return False
    return True


def replace_dir(partial: str, final: str) -> None:
    """Move a finished ``partial`` directory to ``final`` (replacing an old one)."""
    if os.path.exists(final):
        if os.path.isdir(final) and not os.path.islink(final):
            shutil.rmtree(final)
        else:
            os.remove(final)
    os.replace(partial, final)


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    """Write a small text file atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json(path: str, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; a clear error naming the file otherwise."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path} not found ({what})")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConvertError(f"{path} is not valid JSON ({what}): {err}") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: expected a JSON object ({what})")
    return obj


def git_commit() -> str | None:
    """The megapatch source's git commit, when it runs from a checkout."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class PeakMemory:
    """Peak resident memory of this process (Linux ``VmHWM``), for the tools' reports."""

    @staticmethod
    def peak_bytes() -> int | None:
        """Peak RSS in bytes, or None when unavailable."""
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
