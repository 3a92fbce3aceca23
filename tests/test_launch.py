"""The multi-rank harness: results, failures, deaths and hangs."""

from __future__ import annotations

import os
import time

import pytest
import torch.distributed as dist

from schedmoe.errors import RankError
from schedmoe.testing import run_ranks


def returns_rank(rank: int, world: int, offset: int):
    assert dist.get_world_size() == world
    return rank + offset


def rank_raises(rank: int, world: int):
    if rank == 1:
        raise KeyError("the-missing-key")
    return rank


def rank_exits(rank: int, world: int):
    if rank == 0:
        os._exit(7)
    return rank


def rank_hangs(rank: int, world: int):
    while rank == 1:
        time.sleep(0.1)
    return rank


def test_returns_per_rank_results():
    assert run_ranks(returns_rank, 3, 10) == [10, 11, 12]


def test_exception_carries_rank_and_traceback():
    with pytest.raises(RankError, match=r"(?s)rank 1 raised.*KeyError: 'the-missing-key'"):
        run_ranks(rank_raises, 2)
    results = run_ranks(rank_raises, 2, return_exceptions=True)
    assert results[0] == 0 and isinstance(results[1], KeyError)
    assert "rank_raises" in results[1].remote_traceback


def test_dead_rank_is_reported():
    with pytest.raises(RankError, match="rank 0 died with exit code 7"):
        run_ranks(rank_exits, 2)


def test_hang_is_reported_with_stack():
    start = time.monotonic()
    with pytest.raises(RankError, match=r"(?s)rank 1 did not finish within 15 s.*rank_hangs"):
        run_ranks(rank_hangs, 2, timeout=15)
    assert time.monotonic() - start < 40
