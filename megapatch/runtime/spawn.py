"""Run one function on N local gloo ranks: the multi-rank test and benchmark harness.

``run_on_ranks(fn, world_size, *args)`` starts ``world_size`` processes (spawn), gives them a
fresh loopback port, initialises torch.distributed (gloo on CPU) in each, calls
``fn(rank, world_size, *args)`` and returns the list of per-rank results. A failing rank's
exception is re-raised in the parent as :class:`RankError` naming the rank and carrying its
traceback; a world that does not finish within ``timeout_s`` is killed and reported with the
ranks that were still running.

Process start-up (importing torch and megatron-core) dominates on small machines, so callers
should start one world and run many checks inside it.
"""

from __future__ import annotations

import os
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


class RankError(RuntimeError):
    """One or more ranks of a spawned world failed or timed out."""


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
    env: dict[str, str],
) -> None:
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        import torch

        torch.set_num_threads(int(env.get("MEGAPATCH_RANK_THREADS", "1")))
        from megapatch.runtime import distributed

        distributed.init_process_group(timeout_s=float(env.get("MEGAPATCH_PG_TIMEOUT", "300")))
        out = fn(rank, world_size, *args)
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - reported to the parent with the rank id
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megapatch.runtime import distributed

            distributed.destroy()
        except Exception:  # noqa: BLE001
            pass


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 600.0,
    threads_per_rank: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results.

    ``fn`` must be importable (a module-level function) and its result picklable.
    """
    if not 1 <= world_size <= 8:
        raise ValueError(f"world_size must be in 1..8 for local runs, got {world_size}")
    from megapatch.runtime.distributed import find_free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    env = {
        "MEGAPATCH_RANK_THREADS": str(threads_per_rank),
        "MEGAPATCH_PG_TIMEOUT": str(int(timeout_s)),
        "OMP_NUM_THREADS": str(threads_per_rank),
    }
    port = find_free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, env))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(out) - set(failures))
                failures.update({r: f"timed out after {timeout_s:.0f}s" for r in missing})
                break
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if not p.is_alive() and r not in out and r not in failures
                ]
                # A process that died without reporting (segfault, os._exit, kill -9).
                if dead and results.empty():
                    time.sleep(0.5)
                    if results.empty():
                        for r in dead:
                            failures[r] = f"exited with code {procs[r].exitcode} without a result"
                continue
            if ok:
                out[rank] = payload
            else:
                failures[rank] = payload
                # Peers are likely blocked in a collective with the failed rank: stop waiting soon.
                deadline = min(deadline, time.monotonic() + 20.0)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        msg = "\n".join(f"--- rank {r} ---\n{failures[r]}" for r in sorted(failures))
        raise RankError(f"{len(failures)} of {world_size} ranks failed:\n{msg}")
    return [out[r] for r in range(world_size)]
