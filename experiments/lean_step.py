"""One MoE layer on one rank (W=1, T=4096, 8 experts, M 512, H 1024, top-2, capacity factor
1.25, fp32, one thread), forward + backward: padded `[E, C, M]` experts against ragged rows
(only the kept pairs, per-expert GEMMs), interleaved, with the single-thread GEMM rate measured
in the same run, so that useful-FLOP efficiency = (k T 12 M H / GEMM rate) / step time.

    python3 experiments/lean_step.py      # ~1 min; writes results/lean_step.{json,png}
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

import schedmoe

M, H, E, T, K, CF, REPS, STEPS = 512, 1024, 8, 4096, 2, 1.25, 3, 6
OUT = Path(__file__).parent / "results"


def gemm_rate() -> float:
    a, b = torch.randn(T, M), torch.randn(M, H)
    for _ in range(2):
        a @ b
    began = time.perf_counter()
    for _ in range(10):
        a @ b
    return 10 * 2 * T * M * H / (time.perf_counter() - began)


def main() -> None:
    torch.set_num_threads(1)
    layers = {}
    for name, ragged in (("padded", False), ("ragged", True)):
        torch.manual_seed(0)
        layers[name] = schedmoe.MoELayer(M, E, H, top_k=K, capacity_factor=CF, ragged=ragged)
    x = torch.randn(T, M, requires_grad=True)
    times = {name: [] for name in layers}
    rates = []
    for _ in range(REPS):  # interleaved: every variant in every repetition
        rates.append(gemm_rate())
        for name, layer in layers.items():
            for step in range(STEPS + 1):
                began = time.perf_counter()
                layer(x).sum().backward()
                if step:  # the first is a warm-up
                    times[name].append(time.perf_counter() - began)
                layer.zero_grad()
    rate = statistics.median(rates)
    useful = K * T * 12 * M * H / rate
    result = {"command": "python3 experiments/lean_step.py", "gemm_gflops": rate / 1e9,
              "useful_ms": 1e3 * useful,
              "variants": {name: {"median_ms": 1e3 * statistics.median(ts),
                                  "efficiency": useful / statistics.median(ts),
                                  "step_ms": [1e3 * t for t in ts]} for name, ts in times.items()}}
    result["ragged_speedup"] = (result["variants"]["padded"]["median_ms"]
                                / result["variants"]["ragged"]["median_ms"])
    OUT.mkdir(exist_ok=True)
    (OUT / "lean_step.json").write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(result["variants"])
    ax.bar(names, [result["variants"][n]["median_ms"] for n in names], color=["#999", "#3a7"])
    ax.axhline(1e3 * useful, color="k", linestyle="--", label="useful FLOPs at the GEMM rate")
    ax.set_ylabel("forward + backward, ms (median)")
    ax.set_title(f"W=1, T={T}, E={E}, M={M}, H={H}, top-{K}, cf {CF}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "lean_step.png", dpi=120)
    print(json.dumps({k: v for k, v in result.items() if k != "variants"} | {
        n: {k: round(v, 3) for k, v in d.items() if k != "step_ms"}
        for n, d in result["variants"].items()}, indent=1))


if __name__ == "__main__":
    main()
