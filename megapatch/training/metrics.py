"""Metrics in one place: stdout lines, RUN_DIR/metrics.jsonl, TensorBoard, a progress bar,
and the validation-loss plot (against tokens and against FLOPs) at the end.

Only global rank 0 writes; every number it writes is already identical on all ranks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch

from megapatch.config import LoggingConfig
from megapatch.training.flops import peak_tflops


def memory_gib() -> float:
    """Peak device memory (GPU) or resident memory (CPU) of this process, GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def device_peak_tflops(fp8: bool) -> float | None:
    """This GPU's dense peak (None on CPU or an unknown GPU: then no MFU is reported)."""
    if not torch.cuda.is_available():
        return None
    return peak_tflops(torch.cuda.get_device_name(), fp8=fp8)


class MetricsLogger:
    """Writes train and eval records; rank 0 only."""

    def __init__(self, run_dir: str, cfg: LoggingConfig, enabled: bool, fp8: bool) -> None:
        self.enabled = enabled
        self.cfg = cfg
        self.peak = device_peak_tflops(fp8)
        self.jsonl = None
        self.tb = None
        self.progress = cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty())
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")  # noqa: SIM115
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("[metrics] tensorboard is not installed: no TensorBoard events written")
            else:
                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def _write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{record['kind']}/{key}", value, step)

    def train(self, record: dict[str, Any], print_line: bool) -> None:
        """A training record: written every step, printed every log interval."""
        if not self.enabled:
            return
        if self.peak and "tflops_per_gpu" in record:
            record["mfu"] = record["tflops_per_gpu"] / self.peak
        self._write(dict(record, kind="train", time=time.time()))
        if print_line:
            mfu = f" mfu {record['mfu']:.1%}" if "mfu" in record else ""
            gn = record.get("grad_norm")
            line = (
                f"step {record['step']:6d} | {record['stage']:5} K={record['patch_size']} | "
                f"loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"grad norm {gn if gn is None else f'{gn:.3f}'} | "
                f"{record['tokens_per_s']:,.0f} tok/s {record['positions_per_s']:,.0f} pos/s | "
                f"{record['tflops_per_gpu']:.3f} TFLOP/s/dev{mfu} | "
                f"mem {record['memory_gib']:.2f} GiB | data wait {record['data_wait']:.1%}"
            )
            if self.progress:
                sys.stderr.write("\r\033[K")
            print(line, flush=True)
        elif self.progress:
            sys.stderr.write(
                f"\r\033[Kstep {record['step']} loss {record['loss']:.4f} "
                f"{record['tokens_per_s']:,.0f} tok/s"
            )
            sys.stderr.flush()

    def eval(self, record: dict[str, Any]) -> None:
        """A validation record, always printed."""
        if not self.enabled:
            return
        self._write(dict(record, kind="eval", time=time.time()))
        patch = record.get("val_patch_loss")
        extra = f" | patch-level val loss {patch:.4f}" if patch is not None else ""
        if self.progress:
            sys.stderr.write("\r\033[K")
        print(
            f"[eval] step {record['step']} | tokens {record['tokens']:,} | "
            f"val loss {record['val_loss']:.4f} | val ppl {record['val_ppl']:.2f}{extra}",
            flush=True,
        )

    def close(self) -> None:
        """Flush and close the outputs."""
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def read_records(path: str, kind: str) -> list[dict[str, Any]]:
    """Records of ``kind`` from a metrics.jsonl; a resumed step keeps its last record."""
    by_step: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") == kind:
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_validation(runs: dict[str, str], out_png: str) -> None:
    """Validation loss against tokens and against FLOPs for one or more runs' metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tok, ax_flop) = plt.subplots(1, 2, figsize=(11, 4))
    for label, path in runs.items():
        recs = read_records(path, "eval")
        if not recs:
            continue
        ax_tok.plot([r["tokens"] for r in recs], [r["val_loss"] for r in recs], "o-", label=label)
        ax_flop.plot([r["flops"] for r in recs], [r["val_loss"] for r in recs], "o-", label=label)
    ax_tok.set_xlabel("training tokens")
    ax_flop.set_xlabel("training FLOPs")
    for ax in (ax_tok, ax_flop):
        ax.set_ylabel("token-level validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def roll_back_records(path: str, step: int) -> int:
    """Move the records of steps after ``step`` out of ``path`` (a run resumed from the
    checkpoint of ``step`` trains them again) into ``*.rolled_back.jsonl``, so each step
    appears once; returns how many were moved."""
    if not os.path.isfile(path):
        return 0
    keep, moved = [], []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                late = json.loads(line).get("step", 0) > step
            except json.JSONDecodeError:  # a line cut by a kill: nothing to keep
                late = True
            (moved if late else keep).append(line if line.endswith("\n") else line + "\n")
    if moved:
        with open(path.replace(".jsonl", ".rolled_back.jsonl"), "a") as f:
            f.writelines(moved)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return len(moved)
