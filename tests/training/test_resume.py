"""The real CLI in real processes: kill -9 and resume, SIGTERM, layouts' first steps.

Every run is a `megapatch train` process (torchrun for several ranks) on a small real dataset.
Loss trajectories are compared step by step; on CPU in fp32 a resumed run must reproduce the
uninterrupted one bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megapatch.config import to_yaml
from megapatch.training.metrics import read_records
from tests.training.conftest import tiny_run

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _command(cfg_path: Path, nproc: int) -> list[str]:
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


def _write(cfg) -> Path:
    path = Path(cfg.run_dir + ".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


def launch(cfg, nproc=1, fault_at=None, timeout=300) -> subprocess.CompletedProcess:
    """Run to completion. Output goes to files and the run gets its own process group, which
    is killed afterwards: a SIGKILLed trainer leaves megatron's checkpoint-writer helper
    process behind (as a node would lose it with the job step on a cluster)."""
    env = dict(ENV)
    if fault_at is not None:
        env["MEGAPATCH_FAULT_AT_STEP"] = str(fault_at)
    cfg_path = _write(cfg)
    out_path, err_path = Path(f"{cfg_path}.out"), Path(f"{cfg_path}.err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            _command(cfg_path, nproc), env=env, stdout=out, stderr=err, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(proc.args, rc, out_path.read_text(), err_path.read_text())


def _losses(run_dir: str) -> dict[int, tuple]:
    recs = read_records(os.path.join(run_dir, "metrics.jsonl"), "train")
    return {r["step"]: (r["loss"], r["grad_norm"], r["lr"], r["tokens"]) for r in recs}


def _check(proc, ok=True):
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]


def _kill_chain(data_prefix, run_dir, nproc, parallel, faults, **sections):
    cfg = tiny_run(data_prefix, run_dir, parallel=parallel, **sections)
    for step in faults:
        proc = launch(cfg, nproc, fault_at=step)
        assert proc.returncode != 0, f"the run was meant to die at step {step}"
        assert max(_losses(run_dir)) == step
    _check(launch(cfg, nproc))
    return _losses(run_dir)


@pytest.fixture(scope="module")
def full_tp1(data_prefix, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("full") / "tp1")
    proc = launch(tiny_run(data_prefix, run_dir))
    _check(proc)
    return run_dir, _losses(run_dir), proc.stdout


def test_full_run_consumes_the_budget_exactly(full_tp1):
    _, losses, stdout = full_tp1
    assert sorted(losses) == list(range(1, 17))
    assert losses[16][3] == 16 * 1024
    assert "patch" in stdout and "done: 16 steps, 16,384 tokens" in stdout


# Checkpoints every 4 steps and at the boundary (step 11): killed at 6 (patch stage, resumes
# from 4), at 12 (right after the boundary, resumes from 11), at 14 (token stage, from 12).
FAULTS = (6, 12, 14)


def test_kill_9_and_resume_is_bit_identical_tp1(full_tp1, data_prefix, tmp_path):
    _, reference, _ = full_tp1
    resumed = _kill_chain(data_prefix, str(tmp_path / "killed"), 1, {}, FAULTS)
    assert resumed == reference


def test_sigterm_saves_and_exits_cleanly_then_resumes(full_tp1, data_prefix, tmp_path):
    _, reference, _ = full_tp1
    run_dir = str(tmp_path / "term")
    cfg = tiny_run(data_prefix, run_dir)
    proc = subprocess.Popen(
        _command(_write(cfg), 1),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = Path(run_dir) / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and '"step": 2,' in metrics.read_text():
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert "[exit] checkpoint saved at step" in out
    stopped = max(_losses(run_dir))
    assert stopped < 16, "SIGTERM arrived too late to test anything"
    assert (Path(run_dir) / "checkpoints" / f"iter_{stopped:07d}" / "megapatch.json").exists()
    _check(launch(cfg))
    assert _losses(run_dir) == reference


def test_kill_9_and_resume_is_bit_identical_tp2_dp2_distributed_optimizer(data_prefix, tmp_path):
    parallel = dict(tensor_model_parallel_size=2)
    optimizer = dict(use_distributed_optimizer=True)
    full_dir = str(tmp_path / "full4")
    _check(launch(tiny_run(data_prefix, full_dir, parallel=parallel, optimizer=optimizer), 4))
    reference = _losses(full_dir)
    resumed = _kill_chain(
        data_prefix, str(tmp_path / "killed4"), 4, parallel, FAULTS, optimizer=optimizer
    )
    assert resumed == reference


@pytest.mark.parametrize(
    "name, parallel",
    [
        ("tp2", dict(tensor_model_parallel_size=2)),
        ("pp2", dict(pipeline_model_parallel_size=2)),
        ("dp2", dict()),
    ],
)
def test_first_steps_equal_tp1(full_tp1, data_prefix, tmp_path, name, parallel):
    _, reference, _ = full_tp1
    run_dir = str(tmp_path / name)
    cfg = tiny_run(data_prefix, run_dir, parallel=parallel, training=dict(exit_interval=3))
    _check(launch(cfg, 2))
    got = _losses(run_dir)
    assert sorted(got) == [1, 2, 3]
    for step in got:
        assert got[step][0] == pytest.approx(reference[step][0], rel=1e-5, abs=1e-6), step
        assert got[step][1] == pytest.approx(reference[step][1], rel=1e-4), step
