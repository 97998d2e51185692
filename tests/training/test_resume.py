"""The real CLI in real processes: kill -9 and resume, layouts' first steps (stop signals:
test_signals.py, to the trainer's whole process group at many moments).

Every run is a `megapatch train` process (torchrun for several ranks) on a small real dataset.
Loss trajectories are compared step by step; on CPU in fp32 a resumed run must reproduce the
uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from megapatch.training import exit_codes
from tests.training.conftest import tiny_run
from tests.training.runs import (
    check,
    check_stopped,
    launch,
    losses,
)


def _kill_chain(data_prefix, run_dir, nproc, parallel, faults, **sections):
    cfg = tiny_run(data_prefix, run_dir, parallel=parallel, **sections)
    for step in faults:
        proc = launch(cfg, nproc, fault_at=step)
        assert proc.returncode != 0, f"the run was meant to die at step {step}"
        assert max(losses(run_dir)) == step
    check(launch(cfg, nproc))
    return losses(run_dir)


def test_full_run_consumes_the_budget_exactly(full_tp1):
    run_dir, steps, stdout = full_tp1
    assert sorted(steps) == list(range(1, 17))
    assert steps[16][3] == 16 * 1024
    assert "patch" in stdout and "done: 16 steps, 16,384 tokens" in stdout
    summary = json.loads((Path(run_dir) / "run_summary.json").read_text())
    assert summary["status"] == "finished" and summary["exit_code"] == exit_codes.FINISHED
    assert summary["tokens"] == 16 * 1024 and summary["step"] == 16
    assert summary["stage_tokens"] == {"patch": 11 * 1024, "token": 5 * 1024}
    assert summary["val_loss"] > 0


# Checkpoints every 4 steps and at the boundary (step 11): killed at 6 (patch stage, resumes
# from 4) and at 14 (token stage, from 12); right after the boundary (12, from 11): the
# 4-rank test below.
FAULTS = (6, 14)


def test_kill_9_and_resume_is_bit_identical_tp1(full_tp1, data_prefix, tmp_path):
    _, reference, _ = full_tp1
    run_dir = str(tmp_path / "killed")
    resumed = _kill_chain(data_prefix, run_dir, 1, {}, FAULTS)
    assert resumed == reference
    # The steps after each resumed checkpoint were trained again; metrics.jsonl keeps each once.
    from tests.training.runs import train_steps

    assert train_steps(run_dir) == list(range(1, 17))


def test_kill_9_and_resume_is_bit_identical_tp2_dp2_distributed_optimizer(data_prefix, tmp_path):
    """4 ranks, 12 steps (8 patch, 4 token): killed right after the stage boundary (step 9),
    it resumes from the boundary's checkpoint (step 8: sharded optimizer state, stage switch)
    and ends bit for bit as the uninterrupted run; the patch-stage and token-stage kills are
    covered at TP1 above."""
    sections = dict(
        parallel=dict(tensor_model_parallel_size=2),
        optimizer=dict(use_distributed_optimizer=True),
        training=dict(train_tokens=12 * 1024),
    )
    full_dir = str(tmp_path / "full4")
    check(launch(tiny_run(data_prefix, full_dir, **sections), 4))
    reference = losses(full_dir)
    assert sorted(reference) == list(range(1, 13))
    killed = tiny_run(data_prefix, str(tmp_path / "killed4"), **sections)
    assert launch(killed, 4, fault_at=9).returncode != 0
    assert max(losses(killed.run_dir)) == 9
    check(launch(killed, 4))
    assert losses(killed.run_dir) == reference


@pytest.mark.parametrize(
    "name, parallel",
    [
        # TP alone and DP: the 4-rank TP2 x DP2 test above; every layout in-process in
        # tests/model/test_parallel_layouts.py.
        ("pp2", dict(pipeline_model_parallel_size=2)),
        # Patch-level validation under sequence parallelism (positions split over TP ranks).
        ("tp2-sp-eval", dict(tensor_model_parallel_size=2, sequence_parallel=True)),
    ],
)
def test_first_steps_equal_tp1(full_tp1, data_prefix, tmp_path, name, parallel):
    _, reference, _ = full_tp1
    run_dir = str(tmp_path / name)
    training = dict(exit_interval=3, eval_interval=2 if "eval" in name else 8)
    cfg = tiny_run(data_prefix, run_dir, parallel=parallel, training=training)
    check_stopped(launch(cfg, 2), run_dir, nproc=2)
    got = losses(run_dir)
    assert sorted(got) == [1, 2, 3]
    for step in got:
        assert got[step][0] == pytest.approx(reference[step][0], rel=1e-5, abs=1e-6), step
        assert got[step][1] == pytest.approx(reference[step][1], rel=1e-4), step
    if "eval" in name:
        from megapatch.training.metrics import read_records

        [ev] = read_records(os.path.join(run_dir, "metrics.jsonl"), "eval")
        assert ev["step"] == 2 and math.isfinite(ev["val_patch_loss"]) and ev["val_loss"] > 0
