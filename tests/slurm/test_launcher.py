"""slurm/pretrain_7b_patch.sh on a real Slurm: normal completion and every way a job is stopped.

Five jobs of the real launcher run at once (bare metal, 2 tasks, TP2 + sequence parallelism,
distributed optimizer, evaluation in the patch stage), each on its own run directory:

  a  uninterrupted: the reference
  b  ``scontrol requeue`` mid-run (every process gets SIGTERM, KillWait to save)
  c  the time limit: shortened mid-run below the launcher's own ``--signal=B:USR1@300``, so
     Slurm sends the launcher its warning signal, which it forwards to the trainers
  d  ``scancel --signal=TERM`` (every process of the steps)
  e  ``scancel --batch --signal=USR1`` (the batch shell only; the launcher forwards it)

For b-e: a complete checkpoint appears within KillWait of the signal, the same job id comes
back (requeued) and resumes from it, every step is in metrics.jsonl exactly once, and the
losses equal the uninterrupted run's bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.slurm.conftest import REPO

LAUNCHER = REPO / "slurm" / "pretrain_7b_patch.sh"
KILL_WAIT = 30  # tools/local_slurm.sh's KillWait
STEPS = 24  # 16 patch steps (K=4), then 8 token steps
TRAIN_ARGS = (
    "--tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer "
    f"--train-tokens {STEPS * 1024} --global-batch-size 8 --micro-batch-size 2 "
    "--lr-warmup-iters 2 --eval-interval 8 --eval-samples 8 --log-interval 4 "
    "--save-interval 4 --no-tensorboard --no-plot --progress off"
)
# --save-interval 4: the first checkpoint (which starts megatron's writer helper) is written
# before any stop signal, so each stop checkpoint below is an ordinary save.
# scenario -> (how it is stopped, the train step after which it is stopped)
SCENARIOS = {
    "a": (None, None),
    "b": ("scontrol requeue", 6),
    "c": ("time limit", 9),
    "d": ("scancel --signal=TERM", 18),  # in the token stage
    "e": ("scancel --batch --signal=USR1", 12),
}
DEADLINE_S = 600


def _records(metrics: Path, kind: str) -> list[dict]:
    """The records of ``kind`` in a metrics.jsonl, in file order (a line being written skipped)."""
    recs = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            recs.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in recs if r.get("kind") == kind]


def _train_steps(metrics: Path) -> list[int]:
    return [r["step"] for r in _records(metrics, "train")]


class Job:
    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.how, self.at_step = SCENARIOS[name]
        self.run_dir = root / f"run_{name}"
        self.job_id = ""
        self.signal_time: float | None = None
        self.signal_step: int | None = None
        self.stop_sent = False
        self.latest_seen: dict[str, float] = {}  # checkpoint -> when it became the latest
        self.done = False
        self.released = False  # requeued and started without Slurm's begin-time wait

    @property
    def jobs_log(self) -> list[str]:
        path = self.run_dir / "jobs.log"
        return path.read_text().splitlines() if path.exists() else []

    def log(self, submit_dir: Path) -> str:
        paths = list(submit_dir.glob(f"*-{self.job_id}.out"))
        return paths[0].read_text() if paths else ""


def _stop(slurm, job: Job) -> None:
    jid = job.job_id
    if job.how == "scontrol requeue":
        slurm.run("scontrol", "requeue", jid)
    elif job.how == "scancel --signal=TERM":
        slurm.run("scancel", "--signal=TERM", jid)
    elif job.how == "scancel --batch --signal=USR1":
        slurm.run("scancel", "--batch", "--signal=USR1", jid)
    elif job.how == "time limit":
        # Ends 200 s from now: inside the launcher's --signal=B:USR1@300 window, so Slurm sends
        # the warning at its next time-limit check (every 30 s).
        info = slurm.run("scontrol", "show", "job", "-o", jid).stdout
        h, m, s = (["0"] + re.search(r"RunTime=([\d:-]+)", info).group(1).split(":"))[-3:]
        elapsed = int(h) * 3600 + int(m) * 60 + int(s)
        limit = elapsed + 200
        slurm.run("scontrol", "update", f"JobId={jid}", f"TimeLimit={limit // 60}:{limit % 60}")


@pytest.fixture(scope="module")
def scenarios(local_slurm, slurm_data_prefix, tmp_path_factory):
    """Submit the five jobs at once, stop b-e mid-run, wait for every job to finish."""
    root = tmp_path_factory.mktemp("slurm_runs")
    submit_dir = root / "submit"  # the launcher's logs land in the submit directory
    submit_dir.mkdir()
    jobs = {name: Job(name, root) for name in SCENARIOS}
    t0 = time.monotonic()
    try:
        for job in jobs.values():
            env = local_slurm.env(
                MEGAPATCH_REPO=str(REPO),
                CONTAINER="",
                PYTHON=sys.executable,
                RECIPE=str(REPO / "examples" / "tiny_cpu.yaml"),
                RUN_DIR=str(job.run_dir),
                DATA_PATH=slurm_data_prefix,
                TRAIN_ARGS=TRAIN_ARGS,
            )
            proc = subprocess.run(
                # The 7B defaults (2 nodes x 8 GPUs, exclusive, all memory, 4 h) overridden on
                # the sbatch line, as a user does; the rest is the launcher's own.
                ["sbatch", "--parsable", f"--job-name=mp-test-{job.name}", "--nodes=1",
                 "--ntasks-per-node=2", "--gpus-per-node=0", "--mem=2G", "--oversubscribe",
                 "--time=30", str(LAUNCHER)],
                cwd=submit_dir, env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
            job.job_id = proc.stdout.strip().split(";")[0]
        while not all(j.done for j in jobs.values()):
            assert time.monotonic() - t0 < DEADLINE_S, "jobs still running:\n" + "\n".join(
                f"{j.name} {j.job_id}: {j.jobs_log}\n{j.log(submit_dir)[-3000:]}"
                for j in jobs.values()
                if not j.done
            )
            queued = set(local_slurm.run("squeue", "-h", "-o", "%i").stdout.split())
            for job in jobs.values():
                if job.done:
                    continue
                steps = _train_steps(job.run_dir / "metrics.jsonl")
                if job.how and not job.stop_sent and steps and steps[-1] >= job.at_step:
                    job.stop_sent = True
                    if job.how != "time limit":
                        job.signal_step, job.signal_time = steps[-1], time.time()
                    _stop(local_slurm, job)
                if job.name == "c" and job.stop_sent and job.signal_time is None:
                    # Slurm's warning signal reaches the launcher, which logs it
                    stamp = re.search(r"\[launcher (\S+)\] SIGUSR1: asking", job.log(submit_dir))
                    if stamp:
                        t = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%dT%H:%M:%S"))
                        recs = _records(job.run_dir / "metrics.jsonl", "train")
                        job.signal_time = t
                        before = [r["step"] for r in recs if r.get("time", t + 1) <= t]
                        job.signal_step = max(before or steps[-1:])
                latest = job.run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
                name = latest.read_text().strip() if latest.exists() else ""
                if name:
                    job.latest_seen.setdefault(name, time.time())
                if job.how and "restart 0: exit" in str(job.jobs_log) and not job.released:
                    # Requeued: Slurm holds the job ~2 minutes (its begin time) before it may
                    # start again; start it now, which saves that idle wait and tests the same.
                    query = ("squeue", "-h", "-j", job.job_id, "-o", "%T %r")
                    state = local_slurm.run(*query, check=False)
                    if state.stdout.split() == ["PENDING", "BeginTime"]:
                        release = ("scontrol", "update", f"JobId={job.job_id}", "StartTime=now")
                        job.released = local_slurm.run(*release, check=False).returncode == 0
                if job.how == "time limit" and "restart 0: exit" in str(job.jobs_log):
                    # requeued: the next session gets its 30 minutes back
                    update = ("scontrol", "update", f"JobId={job.job_id}", "TimeLimit=30")
                    if local_slurm.run(*update, check=False).returncode == 0:
                        job.how = "time limit, then restored"
                job.done = job.job_id not in queued
            time.sleep(1)
        yield jobs, submit_dir, time.monotonic() - t0
    finally:
        ids = [j.job_id for j in jobs.values() if j.job_id]
        if ids:
            local_slurm.run("scancel", *ids, check=False)
            for _ in range(KILL_WAIT * 2 + 20):
                queued = set(local_slurm.run("squeue", "-h", "-o", "%i").stdout.split())
                if not queued & set(ids):
                    break
                time.sleep(1)


def test_uninterrupted_job_finishes(scenarios):
    jobs, submit_dir, wall = scenarios
    print(f"slurm scenarios: {wall:.0f} s of wall time for the five jobs")
    job = jobs["a"]
    lines = job.jobs_log
    assert len(lines) == 2, lines
    assert f"job {job.job_id} restart 0: started on" in lines[0]
    assert "bare metal" in lines[0] and "2 task(s)" in lines[0]
    assert "exit 0 (ranks: 0 0; srun 0)" in lines[1] and "finished" in lines[1], lines[1]
    assert _train_steps(job.run_dir / "metrics.jsonl") == list(range(1, STEPS + 1))
    summary = json.loads((job.run_dir / "run_summary.json").read_text())
    assert (summary["status"], summary["exit_code"], summary["step"]) == ("finished", 0, STEPS)
    assert summary["world_size"] == 2
    # Beside the run: the resolved config (the launcher's flags in it) and the commit.
    config = yaml.safe_load((job.run_dir / "config.yaml").read_text())
    assert config["parallel"]["tensor_model_parallel_size"] == 2
    assert config["parallel"]["sequence_parallel"] is True
    # a commit of this checkout (HEAD may have moved on since: others commit meanwhile)
    recorded = (job.run_dir / "git_commit.txt").read_text().split("-")[0].strip()
    assert re.fullmatch(r"[0-9a-f]{40}", recorded), recorded
    git = ["git", "-C", str(REPO), "merge-base", "--is-ancestor", recorded, "HEAD"]
    assert subprocess.run(git, capture_output=True).returncode == 0, recorded
    assert re.search(r"commit [0-9a-f]{7,}, log ", lines[0]), lines[0]
    evals = _records(job.run_dir / "metrics.jsonl", "eval")
    assert any("val_patch_loss" in r for r in evals), "no evaluation in the patch stage"


@pytest.mark.parametrize("name", ["b", "c", "d", "e"])
def test_stopped_job_is_requeued_and_resumes_bit_identically(scenarios, name):
    jobs, submit_dir, _ = scenarios
    job, ref = jobs[name], jobs["a"]
    log = job.log(submit_dir)
    lines = job.jobs_log
    assert job.stop_sent, f"{name}: never reached step {job.at_step}: {lines}"
    context = "\n".join(lines) + "\n" + log[-4000:]
    # Two sessions of the same job id: stopped with a checkpoint and requeued, then finished.
    assert all(f"job {job.job_id} restart" in line for line in lines), context
    first = [line for line in lines if "restart 0:" in line]
    second = [line for line in lines if "restart 1:" in line]
    assert len(first) + len(second) == len(lines), context  # no third session
    assert "started" in first[0] and "started" in second[0], context
    assert "restart 1: exit 0" in second[-1] and "finished" in second[-1], context
    if name == "b":
        # Slurm requeues the job itself; the launcher notes the SIGTERM at once (its closing
        # line comes only if the trainers exit within KillWait).
        assert "SIGTERM from Slurm" in first[1], context
        assert len(first) == 2 or "already requeued by Slurm" in first[2], context
    else:
        assert len(first) == 2 and "restart 0: exit 75" in first[1], context
        assert f"requeued (scontrol requeue {job.job_id})" in first[1], context

    # The stop checkpoint (the trainer's [exit] line names it): of the step after which the
    # signal came or later, complete within KillWait of the signal (for c: of the launcher
    # receiving Slurm's warning signal; seen by polling once a second), and the next session
    # resumes from it.
    assert job.signal_time, f"the launcher never got Slurm's time-limit signal:\n{context}"
    stop = re.search(r"\[exit\] .*checkpoint of step (\d+) is complete", log)
    assert stop, f"the trainers never reported their stop checkpoint:\n{context}"
    step = int(stop.group(1))
    ckpt = f"iter_{step:07d}"
    assert step >= job.signal_step, (step, job.signal_step, context)
    if name != "b":
        assert f"latest checkpoint {ckpt}" in first[1], context
    assert ckpt in job.latest_seen, (ckpt, job.latest_seen, context)
    delay = job.latest_seen[ckpt] - job.signal_time
    print(f"{name} ({job.how}): signal after step {job.signal_step}, {ckpt} {delay:.0f} s later")
    assert delay <= KILL_WAIT + 1, (delay, context)
    assert re.search(rf"\[resume\] \S*{ckpt}: step {step}", log), context

    # Every step once; the same losses as the uninterrupted run, bit for bit.
    metrics = job.run_dir / "metrics.jsonl"
    assert _train_steps(metrics) == list(range(1, STEPS + 1))
    got = [(r["step"], r["loss"]) for r in _records(metrics, "train")]
    want = [(r["step"], r["loss"]) for r in _records(ref.run_dir / "metrics.jsonl", "train")]
    assert got == want
    got_eval = [(r["step"], r["val_loss"]) for r in _records(metrics, "eval")]
    ref_metrics = ref.run_dir / "metrics.jsonl"
    want_eval = [(r["step"], r["val_loss"]) for r in _records(ref_metrics, "eval")]
    assert got_eval == want_eval
    summary = json.loads((job.run_dir / "run_summary.json").read_text())
    ref_summary = json.loads((ref.run_dir / "run_summary.json").read_text())
    assert summary["status"] == "finished" and summary["val_loss"] == ref_summary["val_loss"]


def test_dry_run_prints_the_plan_and_the_launch(tmp_path):
    """DRY_RUN=1 on a machine without GPUs or Slurm: the 7B plan for 2 nodes x 8 GPUs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(
        DRY_RUN="1",
        NODES="2",
        GPUS_PER_NODE="8",
        PYTHON=sys.executable,
        CONTAINER="nvcr.io/nvidia/pytorch:25.04-py3",
        DATA_PATH="/data/pile/pile_text_document",
        RUN_DIR=str(tmp_path / "run"),
    )
    proc = subprocess.run(
        ["bash", str(LAUNCHER)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recipe = yaml.safe_load((REPO / "examples" / "llama2_7b.yaml").read_text())
    assert "stage plan on 16 rank(s)" in out
    # the stage table: stage K tokens/sample positions samples/step tokens/step steps tokens ...
    table = r"^(patch|token) +(\d+) +(\d+) +(\d+) +(\d+) +(\d+) +(\d+) +([\d,]+) "
    rows = re.findall(table, out, re.M)
    assert [r[0] for r in rows] == ["patch", "token"], out
    for r in rows:  # steps x tokens/step = the stage's tokens
        assert int(r[6]) * int(r[5]) == int(r[7].replace(",", ""))
    assert sum(int(r[7].replace(",", "")) for r in rows) == recipe["training"]["train_tokens"]
    assert f"{recipe['training']['train_tokens']:,} tokens" in out
    launch = out[out.index("launch") :]
    assert "srun --nodes=2" in launch and "--kill-on-bad-exit=1" in launch
    # pyxis options only with a container; the data directory and run dir are mounted
    assert "--container-image=nvcr.io/nvidia/pytorch:25.04-py3" in launch
    assert f"--container-mounts={REPO},{tmp_path / 'run'},/data/pile" in launch
    assert "--data-path /data/pile/pile_text_document" in launch
    assert not (tmp_path / "run").exists(), "a dry run must not create the run directory"


def test_local_slurm_up_is_idempotent(local_slurm):
    """A second `up` finds everything running and changes nothing; `status` says usable."""
    script = str(REPO / "tools" / "local_slurm.sh")
    pid_files = ("/run/munge/munged.pid", "/run/slurm/slurmctld.pid")
    pids = [Path(p).read_text() for p in pid_files]
    up = subprocess.run([script, "up"], capture_output=True, text=True, timeout=120)
    assert up.returncode == 0 and "already up" in up.stdout, up.stdout + up.stderr
    assert [
        Path(p).read_text() for p in ("/run/munge/munged.pid", "/run/slurm/slurmctld.pid")
    ] == pids
    status = subprocess.run([script, "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    node = local_slurm.run("sinfo", "-h", "-o", "%T").stdout.split()
    assert node and node[0] in ("idle", "mixed", "allocated"), node
