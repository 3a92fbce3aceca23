"""Expert placement under skewed routing: step time of the static placement, a planned one and
a planned one with a replica slot a rank, side by side (issue 27).

    python3 experiments/placement_bench.py            # ~5 minutes on 2 cores

Routing is skewed by a gate bias on Zipf-like scores, scaled until the static placement's
busiest rank gets 1.5x (and 2.0x) the mean pairs; a balanced run (no bias) shows the overhead;
"hot 1.5" biases one expert alone (to 1.5x on its rank), which on 4 ranks takes more pairs
than a rank's fair share: only a replica can even that out.
Layouts: 2 ranks each pinned to a core of its own with one thread (the emulated 2 x 1 layout
without its network), and 4 loopback ranks sharing the 2 cores. Each rank runs the three
layers (same weights) in turn, `steps` forward + backward steps each, `reps` rounds,
interleaved; a step's time is the slowest rank's; medians over the rounds. The planned layers
are re-placed once (`parallel.rebalance`, timed) after warm-up calls have measured the load.

Writes experiments/results/placement_bench.json and .png; the table is in docs/placement.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import schedmoe
from schedmoe.tools.testing import run_ranks

OUT = Path(__file__).resolve().parent / "results"
M, H, E, K, T = 256, 1024, 8, 2, 2048
VARIANTS = {"static": 0, "planned": 0, "planned + 1 replica slot": 1}


def _layer(redundant: int, bias: torch.Tensor) -> schedmoe.MoELayer:
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(M, E, H, top_k=K, capacity_factor=0.0, scheduler="sequential",
                              redundant_slots=redundant, gate_options={"bias": True})
    with torch.no_grad():
        layer.gate.bias_E.copy_(bias)
    return layer


def _skew(bias: torch.Tensor, x: torch.Tensor) -> float:
    """The static placement's max / mean pairs per rank under `bias` (every rank's tokens)."""
    layer = _layer(0, bias)
    with torch.no_grad():
        layer(x)
    return 1.0 / schedmoe.parallel.expert_load(torch.nn.Sequential(layer))["0"].balancedness


def _bias_for(skew: str, x: torch.Tensor) -> torch.Tensor:
    """A bias scaled (bisection) until the static skew is `skew`'s number: Zipf-like, or on
    one expert ("hot ...")."""
    if skew.startswith("hot"):
        shape = torch.zeros(E)
        shape[0] = 1.0
    else:
        shape = torch.log(1.0 / torch.arange(1, E + 1, dtype=torch.float32))
        shape = shape[torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])]  # hot experts on rank 0 first
    target = float(skew.split()[-1])
    lo, hi = 0.0, 12.0
    for _ in range(16):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _skew(mid * shape, x) < target else (lo, mid)
    return lo * shape


def _step_s(layer: schedmoe.MoELayer, x: torch.Tensor) -> float:
    """One forward + backward; the slowest rank's seconds."""
    dist.barrier()
    began = time.perf_counter()
    layer(x).square().mean().backward()
    layer.sync_replica_grads()
    took = torch.tensor(time.perf_counter() - began)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took)


def bench_rank(rank: int, world: int, pinned: bool, skews: list[str], steps: int,
               reps: int) -> dict:
    if pinned:
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    torch.set_num_threads(1)
    x = torch.randn(T, M, generator=torch.Generator().manual_seed(rank))
    found = {}
    for target in skews:
        bias = _bias_for(target, x) if target != "1.0" else torch.zeros(E)
        layers = {name: _layer(r, bias) for name, r in VARIANTS.items()}
        balance, moves_ms, plans = {}, {}, {}
        for name, layer in layers.items():
            with torch.no_grad():
                layer(x)  # the load, measured
            model = torch.nn.Sequential(layer)
            balance[name] = {"before": schedmoe.parallel.expert_load(model)["0"].balancedness}
            if name != "static":
                dist.barrier()
                began = time.perf_counter()
                choice = schedmoe.parallel.rebalance(model)["0"]
                moves_ms[name] = 1e3 * (time.perf_counter() - began)
                plans[name] = {"reason": choice.reason, "slots": layer.placement.slots,
                               "replicated_experts": layer.placement.replicated()}
                layer.load.reset()
                with torch.no_grad():
                    layer(x)
            balance[name]["after"] = schedmoe.parallel.expert_load(model)["0"].balancedness
            _step_s(layer, x)  # warm-up
        times = {name: [] for name in layers}
        for _ in range(reps):
            for name, layer in layers.items():
                times[name].append(statistics.median(_step_s(layer, x) for _ in range(steps)))
        found[target] = {
            "static_skew": 1.0 / balance["static"]["before"], "balancedness": balance,
            "replace_ms": moves_ms, "plans": plans, "step_ms": {n: 1e3 * statistics.median(t)
                                                for n, t in times.items()},
            "rounds_ms": {n: [1e3 * v for v in t] for n, t in times.items()}}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--skews", nargs="+", default=["1.0", "1.5", "2.0", "hot 1.5"])
    parser.add_argument("--out", default="placement_bench", help="results file name")
    args = parser.parse_args()
    skews = args.skews
    results = {}
    for label, world, pinned in (("2 ranks pinned", 2, True), ("4 loopback ranks", 4, False)):
        results[label] = run_ranks(bench_rank, world, pinned, skews, args.steps, args.reps,
                                   timeout=1800, collective_timeout=300)[0]
        print(label, json.dumps({s: r["step_ms"] for s, r in results[label].items()}))
    record = {"command": " ".join(["python3 experiments/placement_bench.py", *sys.argv[1:]]),
              "sizes": dict(
        model_dim=M, hidden_dim=H, experts=E, top_k=K, tokens_per_rank=T),
        "steps": args.steps, "reps": args.reps, "results": results}
    OUT.mkdir(exist_ok=True)
    (OUT / f"{args.out}.json").write_text(json.dumps(record, indent=1))
    plot(results, OUT / f"{args.out}.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4))
    for ax, (label, by_skew) in zip(np.atleast_1d(axes), results.items()):
        skews = list(by_skew)
        for i, name in enumerate(VARIANTS):
            ax.bar(np.arange(len(skews)) + 0.27 * (i - 1),
                   [by_skew[s]["step_ms"][name] for s in skews], 0.27, label=name)
        ax.set_xticks(range(len(skews)), [f"static max/mean {s}" for s in skews])
        ax.set_ylabel("step ms (fwd + bwd, slowest rank)")
        ax.set_title(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
