"""``megapatch study run DIR --backend local``: train the missing cells on this machine.

Each cell is one real ``megapatch train --config DIR/cells/<id>.yaml --run-dir DIR/runs/<id>``
subprocess (under ``torch.distributed.run`` when the cell has several ranks), ``--parallel P``
at a time with ``cores / P`` threads each, its output appended to ``DIR/runs/<id>/train.log``
and each attempt recorded in ``DIR/runs/<id>/study_attempts.jsonl``.

Restartable at any time:

* a cell whose ``run_summary.json`` says "finished" is never started again;
* a started cell resumes from the latest checkpoint in its run directory (megapatch train does
  that by itself); cells with a checkpoint are resumed before fresh ones start;
* every trainer runs in its own process group (session). SIGTERM, SIGINT (Ctrl-C) or SIGHUP
  (unless ignored, as under ``nohup``) to ``study run`` is forwarded as SIGTERM to every
  trainer's group: each finishes its step, writes a checkpoint and exits 75; ``study run``
  waits for them (``--grace`` seconds, then SIGKILL; a second signal kills at once) and exits
  75. If ``study run`` itself is killed (SIGKILL), the kernel sends each trainer SIGTERM
  (Linux ``PR_SET_PDEATHSIG``), so no trainer outlives it for long; a restart waits for such
  a trainer to release its run directory;
* a trainer that exits 75 while the study is not stopping (``--exit-duration-in-mins`` in the
  cell's recipe, say) is started again at once; one that fails (exit 1, 2 or a signal) is
  reported with the end of its log and tried again at the next ``study run``.

Exit code of ``study run``: 0 every selected cell finished; 75 stopped by a signal (run the
same command again); 1 some cell failed; 2 bad input (nothing started).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import fnmatch
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from megapatch.study.manifest import cell_recipe, require_manifest, run_dir
from megapatch.study.spec import StudyError
from megapatch.training import exit_codes

SUMMARY_FILE = "run_summary.json"
TRAINER_LOCK = ".megapatch.lock"  # megapatch train's one-run-per-directory lock
STUDY_LOCK = ".study-run.lock"
ATTEMPTS_FILE = "study_attempts.jsonl"
LOG_FILE = "train.log"


def read_summary(rdir: str) -> dict[str, Any] | None:
    """``run_summary.json`` of a run directory (None when absent or unreadable)."""
    try:
        with open(os.path.join(rdir, SUMMARY_FILE)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(rdir: str) -> bool:
    """The run trained its whole budget (its summary says so)."""
    summary = read_summary(rdir)
    return bool(summary) and summary.get("status") == "finished"


def has_checkpoint(rdir: str) -> bool:
    """A checkpoint to resume from exists in the run directory."""
    root = os.path.join(rdir, "checkpoints")
    return os.path.isdir(root) and any(n.startswith("iter_") for n in os.listdir(root))


def read_attempts(rdir: str) -> list[dict[str, Any]]:
    """The attempts ``study run`` recorded for a cell."""
    path = os.path.join(rdir, ATTEMPTS_FILE)
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def trainer_lock_holder(rdir: str) -> str | None:
    """Who holds the run directory's trainer lock (None when no trainer is running there)."""
    path = os.path.join(rdir, TRAINER_LOCK)
    if not os.path.exists(path):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return holder or "another process"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class StudyLock:
    """One ``study run`` per study directory (an flock on DIR/.study-run.lock)."""

    def __init__(self, study_dir: str) -> None:
        path = os.path.join(study_dir, STUDY_LOCK)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 4096, 0).decode(errors="replace").strip()
            os.close(self.fd)
            raise StudyError(
                f"{study_dir} is being run by {holder or 'another study run'}; one study run per "
                "directory: wait for it, or stop it (it resumes where it was)"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"study run pid {os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Drop the lock."""
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _die_with_parent(parent: int) -> Callable[[], None]:
    """preexec_fn: SIGTERM this child when the study process dies (Linux), even by SIGKILL."""

    def setup() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the study died before prctl took effect
            os._exit(exit_codes.STOPPED)

    return setup


# Rendezvous settings of the environment study run was started in: each trainer is its own
# world (several of them share this machine), so none may inherit them.
RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
RENDEZVOUS_VARS += ("LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


def launch_env(environ: dict[str, str], drop: tuple[str, ...] = RENDEZVOUS_VARS) -> dict[str, str]:
    """``environ`` without the variables that would tie a trainer to another process world."""
    return {k: v for k, v in environ.items() if k not in drop}


def train_command(python: str, recipe: str, rdir: str, world: int) -> list[str]:
    """The ``megapatch train`` command of a cell (torch.distributed.run for several ranks)."""
    args = ["-m", "megapatch.cli", "train", "--config", recipe, "--run-dir", rdir]
    if world == 1:
        return [python, *args]
    dist = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    return [python, *dist, *args]


@dataclass
class Running:
    """A trainer in flight."""

    run_id: str
    proc: subprocess.Popen
    start: float
    step_before: int
    attempt: int
    log: Any


@dataclass
class Outcome:
    """What happened to the cells of one ``study run``."""

    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)


class LocalRunner:
    """Runs the missing cells of a planned study as local ``megapatch train`` subprocesses."""

    def __init__(
        self,
        study_dir: str,
        parallel: int = 1,
        cores: int | None = None,
        only: list[str] | None = None,
        grace: float = 300.0,
        python: str | None = None,
        report: Callable[[str], None] = print,
    ) -> None:
        if parallel < 1:
            raise StudyError(f"--parallel must be >= 1, got {parallel}")
        self.study_dir = study_dir
        self.parallel = parallel
        self.cores = cores or len(os.sched_getaffinity(0))
        self.threads = max(1, self.cores // parallel)
        self.only = only or []
        self.grace = grace
        self.python = python or sys.executable
        self.report = report
        self.stop_signal: int | None = None
        self.killed = False

    # ------------------------------------------------------------------ selection and checks
    def cells(self) -> list[dict[str, Any]]:
        """The manifest rows to run: in the spec, matching --only."""
        rows = [r for r in require_manifest(self.study_dir) if r["in_spec"]]
        if self.only:
            rows = [r for r in rows if any(fnmatch.fnmatch(r["run_id"], p) for p in self.only)]
            if not rows:
                raise StudyError(f"--only {' '.join(self.only)} matches no cell of the study")
        return rows

    def check(self, rows: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> None:
        """Everything that can be refused before a trainer starts (exit code 2): every cell
        to run can run here; cells not started yet also pass megapatch train's own checks
        and the data check (started cells passed them before)."""
        from megapatch.config import ConfigError, load_yaml

        for row in rows:
            if row["layout"]["nodes"] > 1:
                raise StudyError(
                    f"cell {row['run_id']} asks for {row['layout']['nodes']} nodes; run it with "
                    "--backend slurm (the local backend runs on this machine only)"
                )
            recipe = cell_recipe(self.study_dir, row["run_id"])
            if not os.path.isfile(recipe):
                raise StudyError(f"cell {row['run_id']}: {recipe} is missing; re-plan the study")
        if not fresh:
            return
        from megapatch.study.manifest import check_data, read_study_json
        from megapatch.training.validate import validate_config

        for row in fresh:
            try:
                cfg = load_yaml(cell_recipe(self.study_dir, row["run_id"]))
                validate_config(cfg, row["world_size"], runtime=True)
            except ConfigError as err:
                raise StudyError(f"cell {row['run_id']}: {err}") from None
        allow = read_study_json(self.study_dir).get("allow_repeated_data", False)
        for line in check_data(fresh, allow):
            self.report(f"[study] {line}")

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        else:
            self.killed = True

    def _install_handlers(self) -> dict[int, Any]:
        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue  # e.g. SIGHUP under nohup: the user asked to survive it
            old[sig] = signal.signal(sig, self._on_signal)
        return old

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        """Run the missing cells; returns the exit code (0, 1 or 75)."""
        rows = self.cells()
        todo = [r for r in rows if not is_finished(run_dir(self.study_dir, r["run_id"]))]
        done = len(rows) - len(todo)
        if not todo:
            self.report(f"[study] all {len(rows)} cells are finished")
            return exit_codes.FINISHED
        lock = StudyLock(self.study_dir)
        old = self._install_handlers()
        try:
            self.check(todo, [r for r in todo if not _started(self._rdir(r["run_id"]))])
            return self._loop(rows, todo, done)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            lock.release()

    def _loop(self, rows: list[dict], todo: list[dict], done: int) -> int:
        by_id = {r["run_id"]: r for r in rows}
        resumable = [r["run_id"] for r in todo if has_checkpoint(self._rdir(r["run_id"]))]
        queue = resumable + [r["run_id"] for r in todo if r["run_id"] not in resumable]
        self.report(
            f"[study] {len(rows)} cells: {done} finished, {len(resumable)} to resume, "
            f"{len(queue) - len(resumable)} to start; {self.parallel} at a time, "
            f"{self.threads} thread(s) each"
        )
        out = Outcome()
        running: list[Running] = []
        no_progress: dict[str, int] = {}
        forwarded, deadline = False, None
        while running or (queue and not self.stop_signal):
            while not self.stop_signal and queue and len(running) < self.parallel:
                rid = queue.pop(0)
                started = self._start(by_id[rid])
                if started is not None:
                    running.append(started)
                elif self.stop_signal:
                    queue.insert(0, rid)  # stopped while waiting for an earlier trainer
                else:
                    out.failed.append(rid)
            if self.stop_signal and not forwarded:
                name = signal.Signals(self.stop_signal).name
                self.report(
                    f"[study] {name}: stopping {len(running)} trainer(s) (each writes a "
                    "checkpoint); run the same command again to continue"
                )
                for r in running:
                    _signal_group(r.proc, signal.SIGTERM)
                forwarded, deadline = True, time.monotonic() + self.grace
            if forwarded and (self.killed or time.monotonic() > deadline):
                for r in running:
                    _signal_group(r.proc, signal.SIGKILL)
            time.sleep(0.2)
            for r in list(running):
                rc = r.proc.poll()
                if rc is None:
                    continue
                running.remove(r)
                _signal_group(r.proc, signal.SIGKILL)  # helpers left behind by the trainer
                state = self._finish(r, rc, f"{done + len(out.finished) + 1}/{len(by_id)}")
                if state == "finished":
                    out.finished.append(r.run_id)
                elif state == "stopped" and not self.stop_signal:
                    step = (read_summary(self._rdir(r.run_id)) or {}).get("step", 0)
                    no_progress[r.run_id] = no_progress.get(r.run_id, 0) + (step <= r.step_before)
                    if no_progress[r.run_id] >= 2:
                        self.report(f"[study] {r.run_id}: stopped twice without progress")
                        out.failed.append(r.run_id)
                    else:
                        queue.insert(0, r.run_id)  # requeue: it resumes from its checkpoint
                elif state == "stopped":
                    out.stopped.append(r.run_id)
                else:
                    out.failed.append(r.run_id)
        left = len(queue)
        self.report(
            f"[study] {done + len(out.finished)}/{len(by_id)} cells finished; "
            f"{len(out.stopped)} stopped, {len(out.failed)} failed, {left} not started"
            + (f"; failed: {', '.join(out.failed)}" if out.failed else "")
        )
        if self.stop_signal:
            return exit_codes.STOPPED
        return exit_codes.FAILED if out.failed else exit_codes.FINISHED

    def _rdir(self, run_id: str) -> str:
        return run_dir(self.study_dir, run_id)

    def _start(self, row: dict[str, Any]) -> Running | None:
        rid = row["run_id"]
        rdir = self._rdir(rid)
        os.makedirs(rdir, exist_ok=True)
        holder = trainer_lock_holder(rdir)
        if holder:
            self.report(f"[study] {rid}: waiting for the earlier trainer ({holder}) to end")
            until = time.monotonic() + self.grace
            while holder and time.monotonic() < until and not self.stop_signal:
                time.sleep(0.5)
                holder = trainer_lock_holder(rdir)
            if holder:
                self.report(f"[study] {rid}: {holder} still holds {rdir}; not started")
                return None
        world = row["world_size"]
        cmd = train_command(self.python, cell_recipe(self.study_dir, rid), rdir, world)
        threads = str(max(1, self.threads // world))
        env = launch_env(os.environ)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        env["PYTHONUNBUFFERED"] = "1"
        attempt = len(read_attempts(rdir)) + 1
        log = open(os.path.join(rdir, LOG_FILE), "ab")  # noqa: SIM115
        shown = " ".join(_relative(part) for part in cmd)  # the log names no machine paths
        log.write(f"==== study run: attempt {attempt}: {shown}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),  # noqa: PLW1509
        )
        step = (read_summary(rdir) or {}).get("step", 0)
        what = "resume" if has_checkpoint(rdir) else "start"
        self.report(f"[study] {what} {rid} (pid {proc.pid}, {threads} thread(s) per rank)")
        return Running(rid, proc, time.time(), step, attempt, log)

    def _finish(self, r: Running, rc: int, progress: str) -> str:
        r.log.close()
        rdir = self._rdir(r.run_id)
        summary = read_summary(rdir) or {}
        fresh = summary and os.path.getmtime(os.path.join(rdir, SUMMARY_FILE)) >= r.start - 1
        if rc == exit_codes.FINISHED and fresh and summary.get("status") == "finished":
            state = "finished"
        elif rc == exit_codes.STOPPED or (rc == exit_codes.FINISHED and fresh):
            state = "stopped"
        elif self.stop_signal and rc < 0:
            state = "stopped"  # killed after --grace or by a second signal; resumes later
        else:
            state = "failed"
        elapsed = time.time() - r.start
        record = dict(
            attempt=r.attempt,
            start=round(r.start, 3),
            seconds=round(elapsed, 3),
            exit_code=rc,
            state=state,
            threads=self.threads,
        )
        with open(os.path.join(rdir, ATTEMPTS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")
        if state == "finished":
            loss = summary.get("val_loss")
            self.report(
                f"[study] finished {r.run_id} in {elapsed:.0f} s"
                + (f" (val loss {loss:.4f})" if isinstance(loss, (int, float)) else "")
                + f" [{progress} cells finished]"
            )
        elif state == "stopped":
            self.report(
                f"[study] stopped {r.run_id} at step {summary.get('step', '?')} (exit {rc})"
            )
        else:
            why = exit_codes.NAMES.get(rc, f"signal {-rc}" if rc < 0 else f"exit {rc}")
            self.report(f"[study] FAILED {r.run_id} ({why}); end of {rdir}/{LOG_FILE}:")
            for line in _tail(os.path.join(rdir, LOG_FILE), 8):
                self.report(f"    {line}")
        return state


def _started(rdir: str) -> bool:
    return os.path.isfile(os.path.join(rdir, "config.yaml"))


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _tail(path: str, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    return lines[-n:]


def _relative(part: str) -> str:
    """A command-line word, with an absolute path under the working directory made relative."""
    if os.path.isabs(part):
        rel = os.path.relpath(part)
        if not rel.startswith(".."):
            return rel
    return part
