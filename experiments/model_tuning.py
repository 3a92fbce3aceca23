"""Per-model-step tuning: a model with 4 adaptive MoE layers under one StepClock, each layer's
choice against its best fixed configuration, on the emulated 2 nodes x 1 rank (a core each).

    python3 experiments/model_tuning.py      # root; ~5 min on 2 cores; results/model_tuning.*

The model: 4 residual MoE layers of different shapes (hidden dim, top-k), 8 experts, M 256,
1024 tokens per rank, fp32, SGD. Tuning: StepClock on the optimizer, layers tuned one at a
time (algorithms nccl and pipe, r in 1..8). Then, one layer at a time, every fixed
(algorithm, r) in {nccl, pipe} x {1, 2, 4, 8} replaces that layer's schedule while the other
layers keep their tuned choice; a configuration's figure is the model step (slowest rank,
median of STEPS). A layer's gap: the step with its adaptive choice / the step with its best
fixed configuration - 1 (the adaptive choice re-measured in the same sweep).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
M, E, T, STEPS = 256, 8, 1024, 6
LAYERS = [{"hidden_dim": 1024, "top_k": 2}, {"hidden_dim": 256, "top_k": 2},
          {"hidden_dim": 1024, "top_k": 1}, {"hidden_dim": 256, "top_k": 1}]
FIXED = [(a, r) for a in ("nccl", "pipe") for r in (1, 2, 4, 8)]


def worker(out_path: str) -> None:
    import torch
    import torch.distributed as dist

    import schedmoe
    from schedmoe.registry import registry
    from schedmoe.schedulers import AdaptiveScheduler, PipelineScheduler, StepClock
    from schedmoe.comm.topology import release

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(
        schedmoe.MoELayer(M, E, spec["hidden_dim"], spec["top_k"], 1.25,
                          scheduler=AdaptiveScheduler(degrees=tuple(range(1, 9)),
                                                      algorithms=("nccl", "pipe"), shortlist=3,
                                                      trial_steps=3, check_every=10 ** 6))
        for spec in LAYERS)
    optimizer = torch.optim.SGD(layers.parameters(), lr=1e-3)
    clock = StepClock.attach(layers, optimizer)
    x = torch.randn(T, M, generator=torch.Generator().manual_seed(rank))

    def step() -> float:
        dist.barrier()
        began = time.perf_counter()
        h = x
        for layer in layers:
            h = h + layer(h)
        h.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        took = torch.tensor([time.perf_counter() - began])
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        return 1e3 * took.item()

    tuning_steps = 0
    while clock.holder() is not None:
        step()
        tuning_steps += 1
    chosen = [(layer.last_stats.schedule["algorithm"], layer.last_stats.schedule["degree"])
              for layer in layers]
    adaptive_ms = statistics.median(step() for _ in range(STEPS))
    rows = []
    for i, layer in enumerate(layers):
        tuned, tuned_a2a = layer.scheduler, layer.a2a
        ms = {}
        for algorithm, degree in FIXED + [("adaptive", 0)]:
            if algorithm == "adaptive":
                layer.scheduler, layer.a2a = tuned, tuned_a2a
            else:
                layer.scheduler = PipelineScheduler(degree)
                layer.a2a = registry("a2a").get(algorithm)(layer.group, None)
            step()  # warm-up
            ms[f"{algorithm} r={degree}" if degree else "adaptive"] = statistics.median(
                step() for _ in range(STEPS))
        fixed = {k: v for k, v in ms.items() if k != "adaptive"}
        best = min(fixed, key=fixed.get)
        rows.append({"layer": i, **LAYERS[i], "chosen": f"{chosen[i][0]} r={chosen[i][1]}",
                     "ms": ms, "best_fixed": best,
                     "gap": ms["adaptive"] / fixed[best] - 1})
        if rank == 0:
            print(rows[-1], flush=True)
    if rank == 0:
        Path(out_path).write_text(json.dumps({"tuning_steps": tuning_steps,
                                              "adaptive_step_ms": adaptive_ms, "rows": rows}))
    release()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
        return
    from schedmoe.tools.emulate import ClusterSpec, EmulatedCluster

    spec = ClusterSpec(nodes=2, ranks_per_node=1, rate="1gbit", pin_cores=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        with EmulatedCluster(spec) as cluster:
            logs = cluster.launch(["experiments.model_tuning", "--worker", out], timeout=1500,
                                  env={"PYTHONPATH": str(Path(__file__).parent.parent)})
        print(logs[0], end="")
        result = json.loads(Path(out).read_text())
    result.update(command="python3 experiments/model_tuning.py",
                  cluster="emulated 2 nodes x 1 rank, a core per node, 1 Gbit/s",
                  config={"model_dim": M, "experts": E, "tokens": T, "layers": LAYERS,
                          "steps": STEPS, "fixed": FIXED})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "model_tuning.json").write_text(json.dumps(result, indent=1))
    plot(result)
    for row in result["rows"]:
        print(f"layer {row['layer']}: chose {row['chosen']}, best fixed {row['best_fixed']}, "
              f"gap {100 * row['gap']:+.1f}%")


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    keys = list(result["rows"][0]["ms"])
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        ax.bar([i + j * width for i in range(len(result["rows"]))],
               [row["ms"][key] for row in result["rows"]], width, label=key,
               color="black" if key == "adaptive" else None)
    ax.set_xticks([i + 0.4 for i in range(len(result["rows"]))],
                  [f"layer {r['layer']} H{r['hidden_dim']} k{r['top_k']}"
                   for r in result["rows"]])
    ax.set_ylabel("model step, ms (that layer's schedule varied)")
    ax.set_title(result["cluster"], fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(RESULTS / "model_tuning.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
