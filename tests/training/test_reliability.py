"""Nothing lost, nothing silently wrong: faults delivered as the world delivers them.

Real `megapatch train` processes on the tiny two-stage run (11 patch steps, then 5 token
steps). Each case first reproduces what used to go wrong (a changed plan resumed as is, NaN
checkpoints, a second run on the same directory, a full disk, a truncated checkpoint, an
unwritable --save) and checks what happens now against the uninterrupted run.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megapatch.config import ConfigError
from megapatch.training import exit_codes
from megapatch.training.checkpoint import find_latest, read_meta, verify_checkpoint
from megapatch.training.metrics import read_records
from megapatch.training.validate import validate_config
from tests.training.conftest import tiny_run
from tests.training.runs import check, check_stopped, kill_group, launch, losses, start, train_steps


def _error_line(proc) -> str:
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------ resume with another plan
def test_a_changed_plan_is_refused_on_resume_naming_the_flags(data_prefix, tmp_path):
    run_dir = str(tmp_path / "plan")
    cfg = tiny_run(data_prefix, run_dir, training=dict(exit_interval=4))
    check_stopped(launch(cfg), run_dir)
    # The real command: refused by validation (exit 2), before any model is built.
    proc = launch(tiny_run(data_prefix, run_dir, stages=dict(patch_size=2)))
    check(proc, exit_codes.BAD_INPUT)
    assert "--patch-size 2 (checkpoint: 4)" in _error_line(proc)
    assert "--replan" in _error_line(proc)
    # The other changes: the same check, in this process (what `train` runs first).
    for section, change, flag in [
        ("training", dict(train_tokens=24 * 1024, exit_interval=4), "--train-tokens 24576"),
        ("stages", dict(patch_fraction=0.5), "--patch-fraction 0.5"),
        ("data", dict(seq_length=32), "--seq-length 32 (checkpoint: 64)"),
        ("training", dict(global_batch_size=8, exit_interval=4), "--global-batch-size 8"),
        ("data", dict(seed=7), "--seed 7 (checkpoint: 1234)"),
    ]:
        with pytest.raises(ConfigError) as err:
            validate_config(tiny_run(data_prefix, run_dir, **{section: change}), 1)
        assert flag in str(err.value), str(err.value)
        assert "--seed" in flag or "--replan" in str(err.value)
    # Mid patch stage with shuffled samples, a re-plan cannot be exact: refused, naming the
    # stage's end (step 11) as the point to re-plan from.
    replan = tiny_run(data_prefix, run_dir, stages=dict(patch_size=2), checkpoint=dict(replan=True))
    proc = launch(replan)
    check(proc, exit_codes.BAD_INPUT)
    assert "part-way through the patch stage" in _error_line(proc)
    assert "(step 11;" in _error_line(proc)
    assert max(losses(run_dir)) == 4  # nothing trained by the refused resumes


def test_replan_extends_a_finished_run_from_the_exact_stream_position(
    full_tp1, data_prefix, tmp_path
):
    """Train 16 steps, then ask for 20: the new token stage starts where the stream stands."""
    _, reference, _ = full_tp1
    run_dir = str(tmp_path / "extend")
    cfg = tiny_run(data_prefix, run_dir)
    check(launch(cfg))
    assert losses(run_dir) == reference
    more = tiny_run(
        data_prefix,
        run_dir,
        training=dict(train_tokens=20 * 1024),
        stages=dict(patch_fraction=0.55),  # 11 of 20 steps: the patch stage is done
        checkpoint=dict(replan=True),
    )
    proc = launch(more)
    check(proc)
    assert "re-planned: 2 stage(s) done (16,384 tokens), 1 new stage(s)" in proc.stdout
    assert train_steps(run_dir) == list(range(1, 21))
    got = losses(run_dir)
    assert {s: got[s] for s in reference} == reference  # the first 16 steps untouched
    meta = read_meta(find_latest(os.path.join(run_dir, "checkpoints")))
    stages = [(s["name"], s["patch_size"], s["steps"], s["tokens"]) for s in meta["plan"]]
    assert stages == [("patch", 4, 11, 11264), ("token", 1, 5, 5120), ("token", 1, 4, 4096)]
    # Stages lie back to back on the stream: the new one reads [16384, 20480), nothing twice.
    assert meta["state"]["consumed_samples"] == [44, 80, 64] and meta["state"]["tokens"] == 20480
    assert meta["replans"][0]["step"] == 16
    # A new stage starts as after a stage switch: a fresh warmup to the peak over 2 steps
    # (the old schedule had decayed to --min-lr 3e-4 at step 16).
    assert got[16][2] == pytest.approx(3e-4)
    assert got[17][2] == pytest.approx(3e-3 / 2) and got[18][2] == pytest.approx(3e-3)


def test_replan_mid_stage_without_shuffle_closes_the_stage_exactly(data_prefix, tmp_path):
    run_dir = str(tmp_path / "closed")
    base = dict(data=dict(shuffle_samples=False))
    check_stopped(
        launch(tiny_run(data_prefix, run_dir, training=dict(exit_interval=6), **base)), run_dir
    )
    k2 = tiny_run(
        data_prefix, run_dir, stages=dict(patch_size=2), checkpoint=dict(replan=True), **base
    )
    proc = launch(k2)
    check(proc)
    meta = read_meta(find_latest(os.path.join(run_dir, "checkpoints")))
    stages = [(s["patch_size"], s["tokens_per_sample"], s["steps"]) for s in meta["plan"]]
    # K=4 closed at step 6 (stream [0, 6144)), then K=2 for the rest of 2/3 of the budget
    # (11 steps in all), then the token stage: 16 steps, 16,384 tokens, as asked.
    assert stages == [(4, 256, 6), (2, 128, 5), (1, 64, 5)]
    assert meta["state"]["consumed_samples"] == [24, 40, 80]
    assert train_steps(run_dir) == list(range(1, 17))
    assert meta["state"]["tokens"] == 16 * 1024


# ------------------------------------------------------------------ NaN / Inf
@pytest.mark.parametrize("action", ["skip", "stop"])
def test_non_finite_steps_never_reach_a_checkpoint(data_prefix, tmp_path, action):
    """lr 1e6: the gradient norm turns NaN at step 3. 'skip' skips the update (3 in a row
    stop the run), 'stop' stops at once; either way exit 1 naming the step, every checkpoint
    finite, the newest kept by pruning, and it exports."""
    run_dir = str(tmp_path / action)
    cfg = tiny_run(
        data_prefix,
        run_dir,
        optimizer=dict(lr=1e6, min_lr=0.0),
        checkpoint=dict(save_interval=2, keep_last=1),
        training=dict(nonfinite_action=action, max_nonfinite_steps=3),
    )
    proc = launch(cfg)
    check(proc, exit_codes.FAILED)
    line = _error_line(proc)
    assert "gradient norm nan" in line and "is finite" in line
    stopped = int(line.split("step ")[1].split(":")[0])
    recs = read_records(os.path.join(run_dir, "metrics.jsonl"), "train")
    skipped = [r["step"] for r in recs if r["skipped"]]
    assert skipped and all(math.isnan(r["grad_norm"]) for r in recs if r["skipped"])
    assert stopped == (skipped[0] if action == "stop" else skipped[-1])
    root = os.path.join(run_dir, "checkpoints")
    ckpts = [n for n in sorted(os.listdir(root)) if n.startswith("iter_")]
    assert len(ckpts) == 1  # --keep-last 1, and the one kept is the newest (finite) one
    assert action == "skip" or ckpts == [f"iter_{stopped - 1:07d}"]
    latest = find_latest(root, verify=True)
    assert latest is not None and latest.endswith(ckpts[0])
    # The export refuses NaN/Inf weights (tests/convert): it succeeds, the weights are finite.
    export = subprocess.run(
        [*_cli(), "convert", "export", "--load", root, "--save", str(tmp_path / f"hf_{action}")],
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0, export.stderr[-2000:]


def _cli() -> list[str]:
    import sys

    return [sys.executable, "-m", "megapatch.cli"]


# ------------------------------------------------------------------ one run per run directory
def test_a_second_run_on_the_same_directory_is_refused(data_prefix, tmp_path):
    run_dir = str(tmp_path / "shared")
    first_cfg = tiny_run(data_prefix, run_dir, training=dict(train_tokens=1024 * 1024))
    out = open(f"{run_dir}.first.out", "w")  # noqa: SIM115
    first = start(first_cfg, stdout=out, stderr=subprocess.STDOUT)
    try:
        metrics = Path(run_dir) / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while not (metrics.exists() and '"step": 2,' in metrics.read_text()):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        config_before = (Path(run_dir) / "config.yaml").read_text()
        second = launch(first_cfg)  # the same command again, by mistake
        check(second, exit_codes.BAD_INPUT)
        line = _error_line(second)
        assert f"is in use by megapatch train pid {first.pid}" in line
        assert (Path(run_dir) / "config.yaml").read_text() == config_before
        os.killpg(first.pid, signal.SIGTERM)
        assert first.wait(timeout=120) == exit_codes.STOPPED
    finally:
        kill_group(first)
        out.close()
    steps = train_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1)), "only the first run wrote metrics"


# ------------------------------------------------------------------ damaged checkpoints
def test_a_damaged_latest_checkpoint_is_passed_over_and_kept(full_tp1, data_prefix, tmp_path):
    _, reference, _ = full_tp1
    run_dir = str(tmp_path / "damaged")
    cfg = tiny_run(data_prefix, run_dir, training=dict(exit_interval=8))
    check_stopped(launch(cfg), run_dir)
    root = Path(run_dir) / "checkpoints"
    shard = sorted((root / "iter_0000008").glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)  # a copy cut short
    assert "bytes" in verify_checkpoint(str(root / "iter_0000008"))
    cfg = tiny_run(data_prefix, run_dir)
    proc = launch(cfg)
    check(proc)
    assert f"{root / 'iter_0000008'} is damaged" in proc.stdout
    assert f"[resume] {root / 'iter_0000004'}: step 4" in proc.stdout
    assert (root / "iter_0000008.damaged").is_dir(), "the damaged checkpoint is kept"
    assert verify_checkpoint(str(root / "iter_0000008")) is None  # re-written whole
    assert losses(run_dir) == reference
    (root / "iter_0000016" / "metadata.json").unlink()  # megatron's metadata lost
    assert "metadata.json is missing" in verify_checkpoint(str(root / "iter_0000016"))
    assert find_latest(str(root), verify=True).endswith("iter_0000012")


# ------------------------------------------------------------------ where checkpoints go
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB file system (one tiny checkpoint fits, the next does not): a full disk."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that fills) needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)])
    if proc.returncode:
        pytest.skip("this machine cannot mount a tmpfs (a disk that fills)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_a_full_disk_keeps_the_previous_checkpoint(full_tp1, data_prefix, tmp_path, small_tmpfs):
    _, reference, _ = full_tp1
    run_dir = str(tmp_path / "full")
    root = small_tmpfs / "ckpt"
    cfg = tiny_run(data_prefix, run_dir, checkpoint=dict(save=str(root)))
    proc = launch(cfg)
    check(proc, exit_codes.FAILED)
    line = _error_line(proc)
    assert "checkpoint of step 8" in line and "the disk is full" in line
    assert f"{root / 'iter_0000004'} is intact" in line
    assert sorted(p.name for p in root.iterdir()) == [
        ".megapatch.lock",  # the lock of a --save root outside the run dir
        "iter_0000004",
        "latest_checkpointed_iteration.txt",
    ]
    assert verify_checkpoint(str(root / "iter_0000004")) is None
    # Space is freed: the same command resumes from step 4 and ends as if nothing happened.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    proc = launch(cfg)
    check(proc)
    assert f"[resume] {root / 'iter_0000004'}: step 4" in proc.stdout
    assert losses(run_dir) == reference


def test_unwritable_checkpoint_locations_are_refused_before_training(
    data_prefix, tmp_path, small_tmpfs
):
    run_dir = tmp_path / "ro"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a directory")
    proc = launch(tiny_run(data_prefix, str(run_dir)))
    check(proc, exit_codes.BAD_INPUT)
    assert "checkpoints is a file, not a directory" in _error_line(proc)
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    cfg = tiny_run(data_prefix, str(tmp_path / "ro2"), checkpoint=dict(save=str(small_tmpfs / "c")))
    proc = launch(cfg)
    check(proc, exit_codes.BAD_INPUT)
    assert "is not writable" in _error_line(proc) and "read-only" in _error_line(proc)
    assert not (tmp_path / "ro2" / "metrics.jsonl").exists()
