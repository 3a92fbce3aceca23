"""Dropless with and without padding on a skewed router (issue 11).

    python3 experiments/ragged_bench.py        # ~3 minutes on 2 cores

4 gloo ranks, 8 experts (M 512, H 1024, top-2, fp32, sequential schedule), T = 1024 tokens per
rank, dropless (capacity_factor 0). The router is skewed: two experts' gate rows are pushed
towards the inputs' common direction, so they take several times the mean load. Padded
(`ragged=False`: every expert padded to the busiest expert's load in the group, as before) and
ragged (`ragged=True`, the default; and the same with per-expert GEMMs instead of
torch._grouped_mm) are timed interleaved in one run (forward + backward,
median of the slowest rank); wire bytes are those of one step; peak memory is the growth of
each rank's peak RSS over 5 steps, each variant in fresh processes.

Writes experiments/results/ragged_bench.json and .png.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
M, E, H, K, TOKENS, WORLD = 512, 8, 1024, 2, 1024, 4


def make_layer(ragged: bool):
    import schedmoe

    torch.manual_seed(0)
    layer = schedmoe.MoELayer(M, E, H, K, 0.0, ragged=ragged)
    with torch.no_grad():  # two hot experts
        layer.gate.wg_EM[0] += 0.004
        layer.gate.wg_EM[5] += 0.003
    return layer


def inputs(rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rank)
    return (torch.randn(TOKENS, M, generator=gen) + 0.5).requires_grad_()


def step(layer, x) -> float:
    t0 = time.perf_counter()
    y = layer(x)
    (y.square().mean() + 0.01 * y.l_aux).backward()
    elapsed = torch.tensor([1e3 * (time.perf_counter() - t0)])
    torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
    return float(elapsed)


def timing_rank(rank: int, world: int, rounds: int) -> dict:
    torch.set_num_threads(1)
    layers = {"padded": make_layer(False), "ragged": make_layer(True),
              "ragged_per_expert_gemms": make_layer(True)}
    # the same ragged layer with its experts as 2-D GEMMs per expert, not torch._grouped_mm
    layers["ragged_per_expert_gemms"].experts._grouped_mm_fits = lambda x: False
    x = inputs(rank)
    times: dict[str, list[float]] = {name: [] for name in layers}
    for i in range(rounds + 1):
        for name, layer in (list(layers.items()) if i % 2 == 0 else
                            reversed(list(layers.items()))):
            ms = step(layer, x)
            if i:
                times[name].append(ms)
    stats = {}
    for name, layer in layers.items():
        s = layer.last_stats
        stats[name] = {"capacity": s.capacity, "wire_bytes": s.wire_bytes,
                       "counts": s.counts, "processed": s.processed}
    return {"times": times, "stats": stats}


def memory_rank(rank: int, world: int, ragged: bool) -> float:
    torch.set_num_threads(1)
    layer = make_layer(ragged)
    x = inputs(rank)
    step(layer, x)  # warm-up: allocator and communicator set up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(5):
        step(layer, x)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # MiB


def main() -> None:
    from schedmoe.tools.testing import run_ranks

    per_rank = run_ranks(timing_rank, WORLD, 10, timeout=1200)
    times, stats = per_rank[0]["times"], [r["stats"] for r in per_rank]
    counts = torch.tensor([s["ragged"]["counts"] for s in stats]).sum(0).float()
    result = {"command": "python3 experiments/ragged_bench.py", "world": WORLD,
              "tokens_per_rank": TOKENS, "model_dim": M, "hidden_dim": H, "experts": E,
              "top_k": K, "load_max_over_mean": float(counts.max() / counts.mean()),
              "load_per_expert": counts.tolist(), "variants": {}}
    for name in ("padded", "ragged"):
        wire = {ex: sum(s[name]["wire_bytes"][ex][1] for s in stats)
                for ex in ("dispatch", "combine", "dispatch.bwd", "combine.bwd")}
        memory = run_ranks(memory_rank, WORLD, name == "ragged", timeout=1200)
        result["variants"][name] = {
            "step_ms_median": statistics.median(times[name]), "step_ms": times[name],
            "capacity": stats[0][name]["capacity"],
            "wire_bytes_all_ranks_per_step": wire, "wire_bytes_total": sum(wire.values()),
            "peak_rss_growth_mib_per_rank": memory}
    padded, ragged = result["variants"]["padded"], result["variants"]["ragged"]
    result["ragged_over_padded"] = {
        "step_ms": ragged["step_ms_median"] / padded["step_ms_median"],
        "wire_bytes": ragged["wire_bytes_total"] / padded["wire_bytes_total"],
        "peak_rss_growth": max(ragged["peak_rss_growth_mib_per_rank"]) /
        max(max(padded["peak_rss_growth_mib_per_rank"]), 1e-9)}
    result["ragged_per_expert_gemms_step_ms_median"] = statistics.median(
        times["ragged_per_expert_gemms"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ragged_bench.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "ragged_bench.png")
    json.dump({k: v for k, v in result.items() if k != "variants"}, sys.stdout, indent=1)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["padded", "ragged"]
    v = result["variants"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    panels = [("median step, slowest rank (ms)", [v[n]["step_ms_median"] for n in names]),
              ("wire bytes per step, all ranks (MiB)",
               [v[n]["wire_bytes_total"] / 2 ** 20 for n in names]),
              ("peak RSS growth, worst rank (MiB)",
               [max(v[n]["peak_rss_growth_mib_per_rank"]) for n in names])]
    for ax, (label, values) in zip(axes, panels):
        ax.bar(names, values, color=["tab:gray", "tab:blue"])
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"dropless, 4 CPU ranks, T={result['tokens_per_rank']}, load max/mean "
                 f"{result['load_max_over_mean']:.2f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
