"""How long local ranks take to start: the launcher's fork server (ranks fork from a process that
imported torch and schedmoe once) against Python's "spawn" (every rank imports torch itself).

    python3 experiments/launch_startup.py [ROUNDS]     # ~1 minute on 2 cores, 5 rounds

Each round starts 4 gloo ranks that do one all-reduce and return, once per start method,
interleaved; the fork server's first call (which starts the server) is reported apart. Medians
of the wall time of `schedmoe.tools.launch.spawn`. Writes experiments/results/launch_startup.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch.multiprocessing as mp

RESULTS = Path(__file__).resolve().parent / "results"


def one_all_reduce(rank: int, world: int) -> float:
    import torch
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)
    return float(t)


def timed(method: str) -> float:
    from schedmoe.tools import launch

    real = mp.get_context
    with mock.patch.object(launch.mp, "get_context",
                           lambda _name: real(method)):  # the start method under test
        start = time.perf_counter()
        assert launch.spawn(one_all_reduce, 4, timeout=120) == [4.0] * 4
        return time.perf_counter() - start


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    first_forkserver = timed("forkserver")  # starts the server
    times: dict[str, list[float]] = {"forkserver": [], "spawn": []}
    for _ in range(rounds):
        for method in times:
            times[method].append(timed(method))
    medians = {m: statistics.median(t) for m, t in times.items()}
    result = {"command": "python3 experiments/launch_startup.py", "ranks": 4, "rounds": rounds,
              "seconds": times, "median_s": medians, "forkserver_first_call_s": first_forkserver,
              "speedup": medians["spawn"] / medians["forkserver"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "launch_startup.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("median_s", "forkserver_first_call_s", "speedup")},
                     indent=1))


if __name__ == "__main__":
    main()
