"""A real one-node Slurm (tools/local_slurm.sh) and a small dataset for the launcher tests."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_SLURM = REPO / "tools" / "local_slurm.sh"
UNAVAILABLE = 3  # local_slurm.sh's exit status when Slurm cannot be had on this machine


@dataclasses.dataclass
class LocalSlurm:
    """The running local Slurm: its slurm.conf, and the environment for its client commands."""

    conf: str

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ without any enclosing job's SLURM_* variables or a torch rendezvous
        (sbatch exports the submitting environment: a MASTER_PORT there would be every job's),
        pointed at this Slurm."""
        rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_")) and k not in rendezvous
        }
        env["SLURM_CONF"] = self.conf
        env.update(extra)
        return env

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm client command (sbatch, squeue, scontrol, scancel) against this Slurm.

        Read-only queries (squeue, scontrol show) are retried when slurmctld did not answer
        (a 2-core machine busy with many trainers); commands that act are run once."""
        query = cmd[0] == "squeue" or cmd[:2] == ("scontrol", "show")
        for _attempt in range(4 if query else 1):
            proc = subprocess.run(
                list(cmd), env=self.env(), capture_output=True, text=True, timeout=120
            )
            if proc.returncode == 0 or not query:
                break
            time.sleep(5)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc


@contextlib.contextmanager
def _leases(state: str):
    """The test sessions using the local Slurm (one file per pytest process), under a lock."""
    root = Path(state) / "test-sessions"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield root


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="session")
def local_slurm():
    """Bring the local Slurm up (installing it if needed), or skip saying why it cannot be.

    Several pytest sessions may use it at once: each holds a lease, and the last one to finish
    takes it down, if a test session brought it up (one started by hand stays up).
    """
    if os.geteuid() != 0:
        pytest.skip(
            f"a local Slurm needs root (tools/local_slurm.sh installs and starts munge, "
            f"slurmctld and slurmd); running as uid {os.geteuid()}"
        )
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm (slurm-wlm) is not installed and apt-get is absent to install it")
    state = os.environ.get("LOCAL_SLURM_DIR", "/tmp/megapatch-slurm")
    with _leases(state) as leases:
        was_up = subprocess.run([str(LOCAL_SLURM), "status"], capture_output=True).returncode == 0
        proc = subprocess.run([str(LOCAL_SLURM), "up"], capture_output=True, text=True, timeout=600)
        output = (proc.stdout + proc.stderr).strip()
        if proc.returncode == UNAVAILABLE:
            pytest.skip(f"no local Slurm: {output}")
        assert proc.returncode == 0, f"tools/local_slurm.sh up failed:\n{output}"
        others = [p for p in leases.iterdir() if p.name.isdigit() and _alive(int(p.name))]
        if not was_up:
            (leases / "started-by-tests").touch()
        elif not others:  # up, and no test session uses it: started by hand
            (leases / "started-by-tests").unlink(missing_ok=True)
        (leases / str(os.getpid())).touch()
    yield LocalSlurm(conf=os.path.join(state, "slurm.conf"))
    with _leases(state) as leases:
        (leases / str(os.getpid())).unlink(missing_ok=True)
        others = [p for p in leases.iterdir() if p.name.isdigit() and _alive(int(p.name))]
        if not others and (leases / "started-by-tests").exists():
            subprocess.run([str(LOCAL_SLURM), "down"], capture_output=True, timeout=300)
            (leases / "started-by-tests").unlink()


@pytest.fixture(scope="session")
def slurm_data_prefix(data_prefix) -> str:
    """The small real dataset the training tests use (tests/conftest.py)."""
    return data_prefix
