"""The multi-rank harness: results, failures, deaths and hangs; a launcher that owns its ranks
(fails fast, forwards signals, leaves no orphan)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from schedmoe.errors import RankError
from schedmoe.tools.launch import spawn
from schedmoe.tools.testing import run_ranks


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


def rank_fails_while_others_wait(rank: int, world: int):
    if rank == 1:
        raise KeyError("the-first-failure")
    time.sleep(120)  # rank 0 would wait far longer than the grace
    return rank


def test_the_others_are_stopped_soon_after_a_rank_fails():
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        spawn(rank_fails_while_others_wait, 3, timeout=120, grace=1.0)
    assert time.monotonic() - start < 30
    text = str(info.value)
    assert text.index("rank 1 raised") < text.index("rank 0 was stopped 1 s after rank 1 failed")


def rank_wedges(rank: int, world: int):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # wedged: never calls in
    dist.barrier()
    return rank


def test_a_wedged_rank_ends_the_call_at_the_others_collective_timeout():
    start = time.monotonic()
    results = spawn(rank_wedges, 3, timeout=120, collective_timeout=3, grace=1.0,
                    return_exceptions=True)
    assert time.monotonic() - start < 30
    assert all(isinstance(r, Exception) for r in results)
    assert "was stopped 1 s after rank" in str(results[1])


def sleeper(rank: int, world: int, directory: str):
    (Path(directory) / f"{rank}.pid").write_text(str(os.getpid()))
    time.sleep(300)


LAUNCHER = """
import sys
from schedmoe.tools.launch import spawn
from test_launch import sleeper
spawn(sleeper, 3, (sys.argv[1],), timeout=600)
"""


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"  # exited, not yet reaped by whoever adopted it


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_the_launcher_alone_leaves_no_rank_behind(tmp_path, sig):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("*.pid"))) < 3:
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()
        time.sleep(0.05)
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    pids += _children(launcher.pid)  # its fork server and resource tracker
    assert len(pids) >= 5
    launcher.send_signal(sig)
    launcher.wait(timeout=30)
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"processes left running after {sig!r}"
        time.sleep(0.05)
