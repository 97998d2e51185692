"""Stop signals: what a scheduler does to a job, and how a run survives it with a checkpoint.

Slurm's time limit, ``scontrol requeue``, ``scancel --signal=...`` and ``--signal=SIG@T`` deliver
the signal to **every process of the job step**, not just the trainer: megatron's checkpoint
writer helper (a multiprocessing manager started at the first save), the writer processes
forked for each save, and the DataLoader workers. Left at their default disposition those die
at once, and the save that the trainer then attempts fails half-way. So:

* the trainer handles SIGTERM and SIGUSR1 by setting a flag (:class:`ExitMonitor`): it finishes
  the current step (and evaluation or save in progress), writes a complete checkpoint of that
  step and exits with :data:`~megapatch.training.exit_codes.STOPPED`;
* every helper process we start, or that megatron or torch start for us, blocks the stop
  signals (:func:`block_stop_signals`): it lives until the trainer no longer needs it, and
  dies with it (:func:`die_with_parent`); SIGKILL, which follows after Slurm's ``KillWait``,
  still ends everything.

Tests deliver signals as the world does, to the whole process group, at chosen points of the
run (``MEGAPATCH_SIGNAL_AT``, see :func:`fault_point`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Also blocked in helper processes: Ctrl-C in a terminal reaches the whole foreground group;
# the trainer stops on KeyboardInterrupt and its helpers must not die under a save.
_HELPER_BLOCKED = {*STOP_SIGNALS, signal.SIGINT}

SIGNAL_AT_ENV = "MEGAPATCH_SIGNAL_AT"  # tests: "<point>:<step>[:<SIGNAME>]"
KILL_AT_ENV = "MEGAPATCH_FAULT_AT_STEP"  # tests: SIGKILL this process after that global step


_EARLY: list[str] = []  # stop signals caught before the run's ExitMonitor existed


def catch_stop_signals_early() -> None:
    """Install a recording handler for SIGTERM/SIGUSR1 at once (before the heavy imports and
    the process group): a signal during start-up is kept for the run's :class:`ExitMonitor`
    instead of killing the process."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _f: _EARLY.append(signal.Signals(signum).name))


def block_stop_signals() -> None:
    """Block SIGTERM, SIGUSR1 and SIGINT in this (helper) process and its future threads."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _HELPER_BLOCKED)


@contextlib.contextmanager
def stop_signals_deferred():  # noqa: ANN201
    """Hold SIGTERM/SIGUSR1 pending in this thread, and in every process forked meanwhile
    (megatron's checkpoint writer processes inherit the mask), until the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the process that started it dies."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def protected_helper_init(*_: object) -> None:
    """Initializer of helper processes (DataLoader ``worker_init_fn``, managers)."""
    block_stop_signals()
    die_with_parent()


def protect_checkpoint_writer() -> None:
    """Start megatron's checkpoint-writer results queue in a helper that survives stop signals.

    megatron-core 0.16.1's ``FileSystemWriterAsync`` (the ``torch_dist`` strategy) sends write
    results through a queue served by a ``multiprocessing`` manager process, spawned lazily at
    the first save (``filesystem_async._get_write_results_queue``). Started here instead, with
    the stop signals blocked and tied to the trainer's life, a job-wide SIGTERM no longer kills
    it under a running save (which otherwise fails with BrokenPipeError and leaves a
    ``.partial`` checkpoint). Idempotent.
    """
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    with stop_signals_deferred():  # a signal must not hit the helper while it starts
        manager.start(initializer=protected_helper_init)
    filesystem_async._results_queue = manager.Queue()
    _KEEP_ALIVE.append(manager)


_KEEP_ALIVE: list[object] = []


class ExitMonitor:
    """SIGTERM/SIGUSR1 and a wall-clock limit, agreed on by every rank.

    Installed first thing in a run, so a signal that arrives while the model or the data are
    being built still ends the run cleanly (with the previous checkpoint as the latest).
    """

    def __init__(self, handle_signals: bool, limit_min: float | None) -> None:
        self.flag = bool(_EARLY) and handle_signals
        self.reason = _EARLY[0] if self.flag else ""
        self.deadline = time.monotonic() + 60 * limit_min if limit_min else None
        for sig in STOP_SIGNALS:  # --no-exit-signal-handler: the default action (death)
            signal.signal(sig, self._on_signal if handle_signals else signal.SIG_DFL)
        if _EARLY and not handle_signals:
            os.kill(os.getpid(), signal.Signals[_EARLY[0]])

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.flag = True
        self.reason = signal.Signals(signum).name

    def should_exit(self) -> bool:
        """True on every rank as soon as one rank got a signal or the time is up (collective)."""
        import torch

        timed_out = self.deadline is not None and time.monotonic() > self.deadline
        if timed_out and not self.reason:
            self.reason = "--exit-duration-in-mins"
        t = torch.tensor([1.0 if (self.flag or timed_out) else 0.0])
        if torch.cuda.is_available():
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        hit = bool(t.item())
        if hit and not self.reason:
            self.reason = "a stop signal on another rank"
        return hit


def fault_point(point: str, step: int) -> None:
    """Tests only: deliver a signal to this whole process group at ``point`` of ``step``.

    ``MEGAPATCH_SIGNAL_AT="save:8"`` sends SIGTERM (or the signal named third, e.g.
    ``"eval:8:SIGUSR1"``) to every process of the group while the checkpoint of step 8 is
    being written, as a scheduler would; ``MEGAPATCH_FAULT_AT_STEP=6`` SIGKILLs the trainer
    after step 6. Only rank 0 fires. Points: ``step`` (a step begins), ``eval`` (between the
    token- and patch-level validation passes), ``save`` (files written, checkpoint not yet
    complete), ``boundary`` (the last step of a stage is done, before its save).
    """
    spec = os.environ.get(SIGNAL_AT_ENV)
    rank0 = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0
    if spec and rank0:
        parts = spec.split(":")
        if parts[0] == point and int(parts[1]) == step:
            sig = signal.Signals[parts[2]] if len(parts) > 2 else signal.SIGTERM
            os.killpg(os.getpgrp(), sig)
    if point == "end" and os.environ.get(KILL_AT_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
