"""Real `megapatch train` processes for the training tests: launch, read metrics, check.

Every run gets its own process group (session) and output files; the group is killed after
the run, so nothing a trainer started outlives the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from megapatch.config import to_yaml
from megapatch.training import exit_codes
from megapatch.training.metrics import read_records

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def command(cfg_path: Path, nproc: int) -> list[str]:
    """`megapatch train --config` (under torchrun for several ranks)."""
    if nproc == 1:
        return [sys.executable, "-m", "megapatch.cli", "train", "--config", str(cfg_path)]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "megapatch.cli",
        "train",
        "--config",
        str(cfg_path),
    ]


def write_config(cfg) -> Path:
    path = Path(cfg.run_dir + ".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


def start(cfg, nproc=1, env=None, stdout=None, stderr=None) -> subprocess.Popen:
    """Start a run in its own process group."""
    return subprocess.Popen(
        command(write_config(cfg), nproc),
        env=dict(ENV, **(env or {})),
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def launch(cfg, nproc=1, fault_at=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run to the end (``fault_at``: SIGKILL the trainer after that step)."""
    env = dict(env or {})
    if fault_at is not None:
        env["MEGAPATCH_FAULT_AT_STEP"] = str(fault_at)
    out_path, err_path = Path(f"{cfg.run_dir}.out"), Path(f"{cfg.run_dir}.err")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = start(cfg, nproc, env, out, err)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            kill_group(proc)
    return subprocess.CompletedProcess(proc.args, rc, out_path.read_text(), err_path.read_text())


def losses(run_dir: str) -> dict[int, tuple]:
    """step -> (loss, grad norm, lr, tokens) of the train records (last record of a step)."""
    recs = read_records(os.path.join(run_dir, "metrics.jsonl"), "train")
    return {r["step"]: (r["loss"], r["grad_norm"], r["lr"], r["tokens"]) for r in recs}


def train_steps(run_dir: str) -> list[int]:
    """Every step of every train record in metrics.jsonl, in file order (duplicates kept)."""
    import json

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if r.get("kind") == "train"]


def check_stopped(proc, run_dir: str, nproc: int = 1) -> None:
    """The run stopped early with a checkpoint: exit code 75 (torchrun, which turns any
    non-zero worker exit into its own 1, reports the workers' 75), summary "stopped"."""
    import json

    if nproc == 1:
        check(proc, exit_codes.STOPPED)
    else:
        assert proc.returncode != 0 and f"exitcode  : {exit_codes.STOPPED} " in proc.stderr, (
            proc.stderr[-3000:]
        )
    summary = json.loads(Path(run_dir, "run_summary.json").read_text())
    assert summary["status"] == "stopped" and summary["exit_code"] == exit_codes.STOPPED


def check(proc, code=exit_codes.FINISHED) -> None:
    tail = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == code, f"exit code {proc.returncode}, expected {code}\n{tail}"
