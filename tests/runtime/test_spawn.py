"""The multi-rank harness: results per rank, failures named by rank, timeouts."""

from __future__ import annotations

import time

import pytest
import torch

from megapatch.runtime.spawn import RankError, run_on_ranks


def _sum_ranks(rank: int, world: int, scale: int) -> dict:
    t = torch.tensor([float(rank)])
    torch.distributed.all_reduce(t)
    return {"rank": rank, "world": world, "sum": float(t) * scale}


def _fail_on_rank_one(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("boom from the second rank")
    return rank


def _sleep(rank: int, world: int) -> None:
    time.sleep(120)


def test_results_come_back_in_rank_order():
    out = run_on_ranks(_sum_ranks, 2, 10, timeout_s=120)
    assert [r["rank"] for r in out] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 10.0 for r in out)


def test_a_failing_rank_is_named_with_its_traceback():
    with pytest.raises(RankError) as err:
        run_on_ranks(_fail_on_rank_one, 2, timeout_s=120)
    msg = str(err.value)
    assert "--- rank 1 ---" in msg and "boom from the second rank" in msg
    assert "--- rank 0 ---" not in msg


def test_a_hung_world_times_out():
    start = time.monotonic()
    with pytest.raises(RankError, match="timed out"):
        run_on_ranks(_sleep, 1, timeout_s=5)
    assert time.monotonic() - start < 60
