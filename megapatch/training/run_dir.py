"""The run directory: the fully resolved config, the git commit and the plan beside the run."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess

from megapatch.config import ConfigError, RunConfig, to_yaml
from megapatch.training.plan import StagePlan

LOCK_FILE = ".megapatch.lock"
SUMMARY_FILE = "run_summary.json"


class RunDirLock:
    """One ``megapatch train`` per run directory: an OS lock (``flock``) on RUN_DIR/.megapatch.lock
    held by global rank 0 for the life of the run. The kernel drops it when the process ends,
    however it ends (kill -9, a node lost with the job), so a stale lock never blocks a restart.
    The file records who holds it (host, pid, Slurm job) for the error a second run gets."""

    def __init__(self, run_dir: str, fd: int | None) -> None:
        self.run_dir, self.fd = run_dir, fd

    @classmethod
    def try_acquire(cls, run_dir: str) -> RunDirLock:
        """Take the lock or raise ConfigError naming its holder."""
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"run directory {run_dir} is in use by {holder}; one run per directory: wait for "
                "it to end (or stop it), or choose another --run-dir"
            ) from None
        job = os.environ.get("SLURM_JOB_ID")
        who = f"megapatch train pid {os.getpid()} on {socket.gethostname()}"
        who += f" (Slurm job {job})" if job else ""
        os.ftruncate(fd, 0)
        os.pwrite(fd, (who + "\n").encode(), 0)
        return cls(run_dir, fd)

    @classmethod
    def acquire_collective(cls, run_dir: str) -> RunDirLock:
        """Rank 0 takes the lock; every rank raises the same error when it is held."""
        import torch

        lock, error = cls(run_dir, None), None
        if torch.distributed.get_rank() == 0:
            try:
                lock = cls.try_acquire(run_dir)
            except ConfigError as err:
                error = str(err)
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0]:
            raise ConfigError(box[0])
        return lock

    def release(self) -> None:
        """Drop the lock (also dropped by the kernel when the process ends)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def write_summary(run_dir: str, summary: dict) -> None:
    """RUN_DIR/run_summary.json, atomically (what sweeps and job scripts read)."""
    path = os.path.join(run_dir, SUMMARY_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "exited"}, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def git_commit() -> str | None:
    """The commit of the megapatch checkout (with '-dirty' for local changes), if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def prepare_run_dir(cfg: RunConfig, plan: list[StagePlan], world_size: int) -> dict:
    """Create RUN_DIR, write config.yaml, git_commit.txt and plan.json; return run metadata.

    A config.yaml already there with other content (a resumed run whose flags changed) is kept
    as config.yaml.1, .2, ... rather than overwritten.
    """
    os.makedirs(cfg.run_dir, exist_ok=True)
    text = to_yaml(cfg)
    path = os.path.join(cfg.run_dir, "config.yaml")
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old != text:
            n = 1
            while os.path.exists(f"{path}.{n}"):
                n += 1
            os.replace(path, f"{path}.{n}")
    with open(path, "w") as f:
        f.write(text)
    commit = git_commit()
    with open(os.path.join(cfg.run_dir, "git_commit.txt"), "w") as f:
        f.write((commit or "unknown (not a git checkout)") + "\n")
    with open(os.path.join(cfg.run_dir, "plan.json"), "w") as f:
        json.dump(dict(world_size=world_size, stages=[s.as_dict() for s in plan]), f, indent=2)
    tokenizer, add_bos = None, False
    if cfg.data.data_path:
        from megapatch.data.stream import parse_blend, read_meta

        meta = next((m for m in read_meta(parse_blend(cfg.data.data_path)[0]) if m), {})
        tokenizer = meta.get("tokenizer_model")
        tokenizer = os.path.abspath(tokenizer) if tokenizer else None
        add_bos = meta.get("bos_id") is not None
    return dict(git_commit=commit, tokenizer_model=tokenizer, add_bos_token=add_bos)
