"""Stop signals delivered as a scheduler delivers them: to every process of the job.

Slurm's time limit, ``scontrol requeue`` and ``scancel --signal`` signal the trainer AND its
helpers (megatron's checkpoint-writer manager, started at the first save, and the DataLoader
workers). One run is stopped again and again — by a SIGTERM to its whole process group after a
periodic save (from outside, as a scheduler), then at chosen moments (a step beginning, during
an evaluation, while a checkpoint is written, at the stage boundary) — and resumed each time.
Each stop must exit 75 with a complete checkpoint of the last finished step as the latest, no
``.partial`` left, no helper process left behind; the resumed chain must equal the
uninterrupted run bit for bit, with every step logged exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from megapatch.training import exit_codes
from megapatch.training.checkpoint import find_latest, read_meta
from tests.training.conftest import tiny_run
from tests.training.runs import check, kill_group, launch, losses, start, train_steps


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid:
                members.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


def _assert_stopped_cleanly(proc: subprocess.CompletedProcess, run_dir: str, step: int) -> None:
    check(proc, exit_codes.STOPPED)
    root = Path(run_dir) / "checkpoints"
    assert not list(root.glob("*.partial")), "a partial checkpoint was left"
    latest = find_latest(str(root))
    assert latest is not None and latest.endswith(f"iter_{step:07d}"), latest
    assert read_meta(latest)["step"] == step
    assert max(losses(run_dir)) == step, "the trainer ran past the step it saved"
    summary = json.loads((Path(run_dir) / "run_summary.json").read_text())
    assert summary["status"] == "stopped" and summary["step"] == step


def _stop_by_group_sigterm_after_periodic_save(cfg, run_dir: str, first_save: int) -> int:
    """SIGTERM to the whole process group once the periodic checkpoint of ``first_save`` is
    complete and its writer helper runs; returns the step the run stopped at."""
    out = open(f"{run_dir}.group.out", "w")  # noqa: SIM115
    proc = start(cfg, 1, stdout=out, stderr=subprocess.STDOUT)
    marker = Path(run_dir) / "checkpoints" / f"iter_{first_save:07d}" / "megapatch.json"
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no periodic save"
            time.sleep(0.01)
        helpers = [p for p in _group_members(proc.pid) if p.pid != proc.pid]
        assert helpers, "expected the checkpoint writer helper and DataLoader workers to run"
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=120)
        # Every helper ends with the trainer: nothing of the group is left (multiprocessing's
        # resource tracker exits when the last helper closes its pipe: allow it a moment).
        deadline = time.monotonic() + 15
        while _group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [" ".join(p.cmdline()) for p in _group_members(proc.pid)]
        assert left == [], left
    finally:
        kill_group(proc)
        out.close()
    text = Path(f"{run_dir}.group.out").read_text()
    assert rc == exit_codes.STOPPED, text[-3000:]
    stopped = max(losses(run_dir))
    _assert_stopped_cleanly(subprocess.CompletedProcess([], rc, text, ""), run_dir, stopped)
    return stopped


def test_group_signals_at_any_moment_leave_a_complete_checkpoint(full_tp1, data_prefix, tmp_path):
    _, reference, _ = full_tp1
    run_dir = str(tmp_path / "signalled")
    # DataLoader workers on (they receive the signal too); checkpoints every 4 steps; the
    # patch stage is steps 1-11 (evaluation at 8), the token stage 12-16.
    cfg = tiny_run(data_prefix, run_dir, data=dict(num_workers=2))
    stopped = _stop_by_group_sigterm_after_periodic_save(cfg, run_dir, first_save=4)
    assert 4 <= stopped < 8
    # A step begins with the signal pending: the step finishes, is saved, the run stops.
    chain = [
        (f"step:{stopped + 1}", stopped + 1),
        # SIGUSR1 during the patch-stage evaluation of step 8 (token- and patch-level).
        ("eval:8:SIGUSR1", 8),
        # SIGTERM at the stage boundary (step 11), before its checkpoint is written.
        ("boundary:11", 11),
        # SIGTERM while the periodic checkpoint of step 12 is being made complete.
        ("save:12", 12),
    ]
    for spec, step in chain:
        proc = launch(cfg, env={"MEGAPATCH_SIGNAL_AT": spec})
        _assert_stopped_cleanly(proc, run_dir, step)
        assert "[resume]" in proc.stdout
    check(launch(cfg))
    assert losses(run_dir) == reference
    assert train_steps(run_dir) == list(range(1, 17)), "every step logged exactly once"
    summary = json.loads((Path(run_dir) / "run_summary.json").read_text())
    assert summary["status"] == "finished" and summary["tokens"] == 16 * 1024


def test_signal_during_setup_stops_without_a_new_checkpoint(data_prefix, tmp_path):
    """A signal while a resumed run builds its model and data: exit 75, latest stands."""
    run_dir = str(tmp_path / "setup")
    cfg = tiny_run(data_prefix, run_dir, training=dict(exit_interval=4))
    check(launch(cfg), exit_codes.STOPPED)
    before = sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir())
    proc = launch(cfg, env={"MEGAPATCH_SIGNAL_AT": "setup:4"}, timeout=120)
    _assert_stopped_cleanly(proc, run_dir, 4)
    assert sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir()) == before
