"""`megapatch study run --backend slurm`: a job array through the project's launcher on a real
one-node Slurm; each array element skips a finished cell at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megapatch.cli import main
from tests.study.conftest import write_study

REPO = Path(__file__).resolve().parents[2]
SPEC = {
    "sizes": {"S": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 2}},
    "grids": [
        {
            "sizes": ["S"],
            "budgets": [8 * 1024],
            "methods": ["token", {"patch": {"K": 4, "lam": 0.5}}],
        }
    ],
    "slurm": {"gpus": False, "container": "", "cpus_per_task": 1, "time": "00:10:00"},
}


def _status(run: Path) -> str | None:
    path = run / "run_summary.json"
    return json.loads(path.read_text())["status"] if path.is_file() else None


def test_slurm_array_trains_every_cell_then_skips_them(tmp_path, study_data, local_slurm):
    study = tmp_path / "study"
    assert (
        main(["study", "plan", str(write_study(tmp_path, study_data, SPEC)), "--out", str(study)])
        == 0
    )
    cmd = [
        sys.executable,
        "-m",
        "megapatch.cli",
        "study",
        "run",
        str(study),
        "--backend",
        "slurm",
        "--parallel",
        "2",
    ]
    env = local_slurm.env(PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [sub] = [
        json.loads(x) for x in (study / "slurm" / "submissions.jsonl").read_text().splitlines()
    ]
    runs = [study / "runs" / i for i in sub["run_ids"]]
    assert len(runs) == 2 and sub["shape"] == [1, 1]
    until = time.monotonic() + 240
    while True:
        queued = local_slurm.run("squeue", "-h", "-j", sub["job_id"], "-o", "%i %T").stdout
        done = all(_status(r) == "finished" for r in runs)
        if not queued.strip():
            break
        assert time.monotonic() < until, f"array {sub['job_id']} not done: {queued}"
        time.sleep(1)
    if not done:
        logs = "\n".join(p.read_text()[-2000:] for p in (study / "slurm" / "logs").iterdir())
        raise AssertionError(f"array {sub['job_id']} ended without finishing:\n{logs}")
    for run in runs:  # trained by the launcher in the job (its jobs.log), not here
        assert "finished" in (run / "jobs.log").read_text()
    # Everything finished: nothing is submitted again.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "all 2 cells are finished" in again.stdout
    assert len((study / "slurm" / "submissions.jsonl").read_text().splitlines()) == 1


def test_array_element_of_a_finished_cell_exits_at_once(tmp_path):
    from megapatch.study.slurm import ELEMENT_SCRIPT

    run = tmp_path / "runs" / "cell-a"
    run.mkdir(parents=True)
    summary = json.dumps({"status": "finished", "step": 8})
    (run / "run_summary.json").write_text(summary)
    (tmp_path / "cells.txt").write_text("cell-b\ncell-a\n")
    script = tmp_path / "element.sh"
    script.write_text(ELEMENT_SCRIPT)
    env = dict(
        os.environ,
        STUDY_DIR=str(tmp_path),
        CELLS=str(tmp_path / "cells.txt"),
        PYTHON=sys.executable,
        MEGAPATCH_LAUNCHER=str(tmp_path / "no-launcher.sh"),  # must not be reached
        SLURM_ARRAY_TASK_ID="1",
    )
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cell cell-a is already finished: nothing to do"
    assert (run / "run_summary.json").read_text() == summary
    # An unfinished cell goes on to the launcher (missing here: bash fails to open it).
    env["SLURM_ARRAY_TASK_ID"] = "0"
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "no-launcher.sh" in proc.stderr
    assert (tmp_path / "runs" / "cell-b").is_dir()
