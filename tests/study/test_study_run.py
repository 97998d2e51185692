"""`megapatch study run` on real `megapatch train` subprocesses: killed (SIGTERM, then
SIGKILL) while a cell trains and restarted, it runs only what is missing; then `collect`.

One flow, two tiny cells (A: 16 token steps; B: 96 steps, patch then token), one trainer at
a time:
1. study run; SIGTERM to the study process while B trains -> B stops with a checkpoint (75);
2. study run again: B resumes; SIGKILL to the study process while B trains -> B's trainer is
   told by the kernel (parent-death signal) and stops with a checkpoint by itself;
3. study run again: B resumes and finishes; A was never touched again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megapatch.cli import main
from megapatch.study.runner import StudyLock, read_attempts, trainer_lock_holder
from megapatch.study.spec import StudyError
from megapatch.training import exit_codes
from tests.study.conftest import write_study

SPEC = {
    "sizes": {"S": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 2}},
    "grids": [
        {"sizes": ["S"], "budgets": [16 * 1024], "methods": ["token"]},
        {"sizes": ["S"], "budgets": [96 * 1024], "methods": [{"patch": {"K": 4, "lam": 0.5}}]},
    ],
}
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megapatch.cli", "study", *args]


def _steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(x)["step"] for x in path.read_text().splitlines() if '"train"' in x]
    return max(steps, default=0)


def _summary(run_dir: Path) -> dict:
    path = run_dir / "run_summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _start(study: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        _cli("run", str(study), "--parallel", "1", "--cores", "1", "--grace", "60"),
        stdout=open(log, "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        env=ENV,
        start_new_session=True,
    )


def _wait(cond, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    until = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"study run ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() < until, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_killed_study_resumes_only_missing_cells_then_collects(tmp_path, study_data, capsys):
    spec = write_study(tmp_path / "spec", study_data, SPEC)
    study, log = tmp_path / "study", tmp_path / "study.log"
    assert main(["study", "plan", str(spec), "--out", str(study)]) == 0
    ids = [json.loads(x)["run_id"] for x in (study / "manifest.jsonl").read_text().splitlines()]
    a, b = (study / "runs" / i for i in ids)
    assert "-d16K-token-" in a.name and "-d96K-patch-k4-" in b.name
    procs = []
    try:
        # 1. SIGTERM while B trains (past its first checkpoint at step 4).
        proc = _start(study, log)
        procs.append(proc)
        _wait(lambda: _steps(b) >= 6, proc, "cell B at step 6")
        with pytest.raises(StudyError, match="is being run by study run pid"):
            StudyLock(str(study))  # one study run per directory
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == exit_codes.STOPPED
        assert _summary(a)["status"] == "finished"
        first_stop = _summary(b)
        assert first_stop["status"] == "stopped" and 6 <= first_stop["step"] < 96
        assert [x["exit_code"] for x in read_attempts(b)] == [exit_codes.STOPPED]
        a_files = {n: (a / n).read_bytes() for n in ("run_summary.json", "metrics.jsonl")}

        # 2. SIGKILL while B trains again: its trainer must stop by itself, with a checkpoint.
        proc = _start(study, log)
        procs.append(proc)
        _wait(lambda: _steps(b) >= first_stop["step"] + 6, proc, "cell B resumed and training")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        until = time.monotonic() + 60
        while trainer_lock_holder(str(b)) and time.monotonic() < until:
            time.sleep(0.1)
        assert trainer_lock_holder(str(b)) is None, "B's trainer outlived the killed study"
        second_stop = _summary(b)
        assert second_stop["status"] == "stopped" and second_stop["step"] > first_stop["step"]

        # 3. Restart: only B runs (it resumes), then everything is finished.
        proc = _start(study, log)
        procs.append(proc)
        assert proc.wait(timeout=120) == exit_codes.FINISHED
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    text = log.read_text()
    assert text.count(f"start {a.name}") == 1 and f"resume {a.name}" not in text
    assert text.count(f"resume {b.name}") == 2
    assert {n: (a / n).read_bytes() for n in a_files} == a_files  # A untouched
    assert _summary(b)["status"] == "finished" and _summary(b)["step"] == 96
    resumed = [x for x in (b / "train.log").read_text().splitlines() if "[resume]" in x]
    assert [f"step {s['step']}," in x for s, x in zip((first_stop, second_stop), resumed)] == [
        True,
        True,
    ]
    # attempt 2 died with the study (SIGKILL): only attempts 1 and 3 were recorded
    assert [x["exit_code"] for x in read_attempts(b)] == [exit_codes.STOPPED, 0]

    # collect: byte-identical twice; rows agree with the trainers' own summaries.
    outputs = []
    for _ in range(2):
        assert main(["study", "collect", str(study)]) == 0
        outputs.append([(study / n).read_bytes() for n in ("results.jsonl", "results.csv")])
    assert outputs[0] == outputs[1]
    rows = {r["run_id"]: r for r in map(json.loads, outputs[0][0].decode().splitlines())}
    manifest = {r["run_id"]: r for r in map(json.loads, (study / "manifest.jsonl").open())}
    for run in (a, b):
        row, summary = rows[run.name], _summary(run)
        assert row["status"] == "finished"
        assert row["val_loss"] == summary["val_loss"] and row["D"] == summary["tokens"]
        assert row["flops"] == summary["flops"] == manifest[run.name]["flops"]
        assert row["wall_seconds"] == summary["seconds"]
    patch = _summary(b)["stage_tokens"]["patch"]
    assert rows[b.name]["D_patch"] == patch and rows[b.name]["lam"] == patch / (96 * 1024)
    assert rows[b.name]["tokens_per_s_patch"] > 0 and rows[a.name]["tokens_per_s_patch"] is None
