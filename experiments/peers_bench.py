"""Ours against DeepSpeed-MoE, side by side in one run (issue 13's workloads on one machine).

8 experts, M 512, H 1024, top-2, capacity factor 1.25, fp32, one thread per rank; forward +
backward of one layer. Per workload one set of ranks runs every system, interleaved, REPS
times; each repetition times STEPS steps after a warm-up; a step's time is the slowest rank's;
we report the median over steps, then the median over repetitions. DeepSpeed-MoE 0.19.8 with
`use_rts=False`, `top2_2nd_expert_sampling=False` (deterministic routing), the same capacity
and `min_capacity=0` (`DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8`,
DS_ACCELERATOR=cpu). The single-thread GEMM rate is measured in the same run.

    python3 experiments/peers_bench.py      # ~5 min on 2 cores; results/peers_bench.{json,png}
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import schedmoe
from schedmoe.tools.launch import spawn

M, H, E, K, CF, REPS, STEPS = 512, 1024, 8, 2, 1.25, 3, 16
WORKLOADS = [("W=1, T=4096", 1, 4096), ("loopback 4 ranks, T=256", 4, 256),
             ("loopback 4 ranks, T=1024", 4, 1024)]
SYSTEMS = ["ours sequential", "ours adaptive", "DeepSpeed-MoE"]
OUT = Path(__file__).parent / "results"


def build(system: str, world: int) -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    if system.startswith("ours"):
        layer = schedmoe.MoELayer(M, E, H, top_k=K, capacity_factor=CF,
                                  scheduler=system.split()[1])
        return layer, lambda x: layer(x)
    import deepspeed
    from deepspeed.moe.layer import MoE

    deepspeed.init_distributed(dist_backend="gloo")
    expert = nn.Sequential(nn.Linear(M, H), nn.GELU(), nn.Linear(H, M))
    layer = MoE(M, expert, num_experts=E, ep_size=world, k=K, capacity_factor=CF,
                eval_capacity_factor=CF, min_capacity=0, drop_tokens=True, use_rts=False,
                top2_2nd_expert_sampling=False)
    return layer, lambda x: layer(x)[0]


def rank_main(rank: int, world: int, tokens: int) -> dict:
    layers = {system: build(system, world) for system in SYSTEMS}
    x = torch.randn(tokens, M, generator=torch.Generator().manual_seed(rank))
    times = {system: [] for system in SYSTEMS}
    for _ in range(REPS):
        for system, (layer, call) in layers.items():
            run = []
            for step in range(STEPS + 2):  # two warm-ups (the adaptive one keeps tuning)
                torch.distributed.barrier()
                began = time.perf_counter()
                call(x.clone().requires_grad_()).sum().backward()
                if step >= 2:
                    run.append(time.perf_counter() - began)
                layer.zero_grad()
            times[system].append(run)
    return times


def gemm_rate() -> float:
    torch.set_num_threads(1)
    a, b = torch.randn(4096, M), torch.randn(M, H)
    a @ b
    began = time.perf_counter()
    for _ in range(10):
        a @ b
    return 10 * 2 * 4096 * M * H / (time.perf_counter() - began)


def main() -> None:
    result = {"command": "python3 experiments/peers_bench.py", "config": {
        "experts": E, "model_dim": M, "hidden_dim": H, "top_k": K, "capacity_factor": CF,
        "reps": REPS, "steps": STEPS}, "workloads": {}}
    rates = []
    for label, world, tokens in WORKLOADS:
        rates.append(gemm_rate())
        per_rank = spawn(rank_main, world, (tokens,), timeout=1800, collective_timeout=300,
                         threads_per_rank=1, env={"DS_ACCELERATOR": "cpu"})
        medians = {}
        for system in SYSTEMS:
            reps = [statistics.median(max(r[system][rep][s] for r in per_rank)
                                      for s in range(STEPS)) for rep in range(REPS)]
            medians[system] = {"median_ms": 1e3 * statistics.median(reps),
                               "reps_ms": [1e3 * v for v in reps]}
        ours = medians["ours sequential"]["median_ms"]
        for system in SYSTEMS:
            medians[system]["vs_ours_sequential"] = medians[system]["median_ms"] / ours
        medians["DeepSpeed-MoE / best of ours"] = medians["DeepSpeed-MoE"]["median_ms"] / min(
            medians[s]["median_ms"] for s in SYSTEMS[:2])
        result["workloads"][label] = medians
        print(label, json.dumps({s: round(v["median_ms"], 1) if isinstance(v, dict) else
                                 round(v, 3) for s, v in medians.items()}))
    rate = statistics.median(rates)
    result["gemm_gflops"] = rate / 1e9
    useful_ms = 1e3 * K * 4096 * 12 * M * H / rate
    w1 = result["workloads"]["W=1, T=4096"]
    result["w1_useful_flop_efficiency"] = {s: useful_ms / w1[s]["median_ms"] for s in SYSTEMS}
    OUT.mkdir(exist_ok=True)
    (OUT / "peers_bench.json").write_text(json.dumps(result, indent=1))
    plot(result)
    print("W=1 useful-FLOP efficiency", json.dumps(result["w1_useful_flop_efficiency"]))


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result["workloads"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(SYSTEMS)
    for i, system in enumerate(SYSTEMS):
        ax.bar([j + i * width for j in range(len(labels))],
               [result["workloads"][w][system]["median_ms"] for w in labels], width,
               label=system)
    ax.set_xticks([j + width for j in range(len(labels))], labels, fontsize=8)
    ax.set_ylabel("forward + backward, ms (slowest rank, median)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "peers_bench.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
