"""Schedulers side by side on an emulated cluster at 1 Gbit/s, with DeepSpeed-MoE.

    python experiments/schedule_bench.py            # root; about 12 minutes on 2 cores
    python experiments/schedule_bench.py --steps 4 --workloads 0,5
    python experiments/schedule_bench.py --layout 2x1   # results/schedule_bench_2x1.*

Layouts: `2x2` (2 nodes x 2 ranks, unpinned: four ranks share the 2 cores, so gloo's transfers
take CPU from the experts) and `2x1` (2 nodes x 1 rank, each node pinned to a core of its own:
what a cluster looks like, where communication does not steal compute).

For each of 12 workloads (tokens per rank, model dim, hidden dim, top-k, capacity factor; 8
experts, 2 per rank, fp32) it times a layer's forward + backward step (slowest rank, median of
--steps after warm-up) for: `sequential`; `pipeline` at r = 2, 4, 8 (flat A2A); `adaptive`
(after its profiling and trial steps); every fixed (algorithm, r) in {nccl, 2dh, pipe} x
{1, 2, 4, 8}
(the exhaustive sweep); and DeepSpeed-MoE's `MoE` layer (gloo, ep_size = ranks, same sizes).

Derived figures: speedups over sequential; overlap efficiency = max(compute, comm) / step,
where comm is the sequential step's A2A time (forward + backward) and compute the rest of that
step; simulator error = adaptive's measured step / the simulator's prediction of that step - 1
(the prediction is the simulated exchange-expert-exchange region, forward and backward, plus the
time the profiled steps spent outside it), for its choice and for every candidate it tried.
Writes experiments/results/schedule_bench{,_2x1}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
EXPERTS = 8
WORKLOADS = [
    {"tokens": t, "model_dim": m, "hidden_dim": h, "top_k": k, "capacity_factor": cf}
    for t in (256, 1024)
    for m, h in ((256, 256), (512, 256), (256, 1024))
    for k, cf in ((2, 1.25), (1, 2.0))
]
SWEEP = [(a, r) for a in ("nccl", "2dh", "pipe") for r in (1, 2, 4, 8)]
LAYOUTS = {"2x2": (2, 2, False), "2x1": (2, 1, True)}  # nodes, ranks per node, pinned cores


def time_steps(make_and_step, warmup: int, steps: int) -> list[float]:
    import torch
    import torch.distributed as dist

    times = []
    for i in range(warmup + steps):
        dist.barrier()
        start = time.perf_counter()
        make_and_step()
        t = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(t.item())
    return times


def worker(out_path: str, steps: int, workload_ids: list[int]) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    faulthandler.enable()  # a rank that aborts prints where it was
    import torch
    import torch.distributed as dist

    import schedmoe
    from schedmoe.schedulers import AdaptiveScheduler, PipelineScheduler
    from schedmoe.schedulers.adaptive import PROFILE_DEGREES
    from schedmoe.comm.topology import release as release_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for wid in workload_ids:
        w = WORKLOADS[wid]
        x = torch.randn(w["tokens"], w["model_dim"],
                        generator=torch.Generator().manual_seed(rank)).requires_grad_()

        def layer_runner(scheduler, a2a="nccl"):
            torch.manual_seed(0)
            layer = schedmoe.MoELayer(w["model_dim"], EXPERTS, w["hidden_dim"], w["top_k"],
                                      w["capacity_factor"], a2a=a2a, scheduler=scheduler)

            def step():
                y = layer(x)
                (y.square().mean() + 0.01 * y.l_aux).backward()
            return layer, step

        row = {"workload": w, "id": wid, "ms": {}}
        layer, step = layer_runner("sequential")
        seq = time_steps(step, 2, steps)
        row["ms"]["sequential"] = 1e3 * statistics.median(seq)
        ops = layer.last_stats.op_ms
        row["sequential_comm_ms"] = sum(v for k, v in ops.items() if k.endswith(".a2a"))
        for a, r in SWEEP:
            _, step = layer_runner(PipelineScheduler(r), a)
            row["ms"][f"{a} r={r}"] = 1e3 * statistics.median(time_steps(step, 2, steps))
        adaptive = AdaptiveScheduler(degrees=tuple(range(1, 17)))
        layer, step = layer_runner(adaptive)
        # profiling (every algorithm with the layer's codec at each profiled degree), then
        # the trials of the shortlisted bands
        tuning = (len(adaptive.algorithms) * len(PROFILE_DEGREES)
                  + adaptive.shortlist * adaptive.trial_steps)
        row["ms"]["adaptive"] = 1e3 * statistics.median(time_steps(step, tuning + 2, steps))
        d = [d for d in adaptive.decisions if d.reason not in ("profile", "trial")][-1]
        row["adaptive_choice"] = {"algorithm": d.algorithm, "codec": d.codec, "degree": d.degree,
                                  "reason": d.reason, "predicted_ms": d.predicted_ms,
                                  "decisions": [(x.step, x.reason, x.algorithm, x.degree,
                                                 x.predicted_ms, x.measured_ms)
                                                for x in adaptive.decisions]}
        row["ms"]["deepspeed"] = 1e3 * statistics.median(time_steps(
            deepspeed_runner(w, x, world), 2, steps))
        if rank == 0:
            print(wid, {k: round(v, 1) for k, v in row["ms"].items()}, row["adaptive_choice"],
                  flush=True)
        results.append(row)
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    release_groups()
    dist.destroy_process_group()


def deepspeed_runner(w: dict, x, world: int):
    import deepspeed
    import torch
    from deepspeed.moe.layer import MoE
    from torch import nn

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    expert = nn.Sequential(nn.Linear(w["model_dim"], w["hidden_dim"]), nn.GELU(),
                           nn.Linear(w["hidden_dim"], w["model_dim"]))
    moe = MoE(hidden_size=w["model_dim"], expert=expert, num_experts=EXPERTS, ep_size=world,
              k=w["top_k"], capacity_factor=w["capacity_factor"],
              eval_capacity_factor=w["capacity_factor"], min_capacity=0, drop_tokens=True)

    def step():
        out, l_aux, _ = moe(x.unsqueeze(0))
        (out.square().mean() + 0.01 * l_aux).backward()
    return step


def summarize(rows: list[dict]) -> list[dict]:
    for row in rows:
        ms = row["ms"]
        seq = ms["sequential"]
        sweep = {k: v for k, v in ms.items() if "r=" in k}
        best_key = min(sweep, key=sweep.get)
        comm = row["sequential_comm_ms"]
        compute = seq - comm
        row["speedup_vs_sequential"] = {k: seq / v for k, v in ms.items()}
        row["best_fixed"] = {"config": best_key, "ms": sweep[best_key]}
        row["adaptive_vs_best_fixed"] = ms["adaptive"] / sweep[best_key] - 1
        row["comm_bound"] = comm > compute
        row["overlap_efficiency"] = {k: max(compute, comm) / v for k, v in ms.items()
                                     if k not in ("deepspeed",)}
        predicted = row["adaptive_choice"]["predicted_ms"]
        row["simulator_error"] = ms["adaptive"] / predicted - 1 if predicted else None
        row["simulator_error_trials"] = [
            {"config": f"{alg} r={r}", "predicted_ms": p, "measured_ms": statistics.median(m[1:]),
             "error": statistics.median(m[1:]) / p - 1}
            for _, reason, alg, r, p, m in row["adaptive_choice"]["decisions"]
            if reason == "trial" and len(m) > 1]
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| # | T | M | H | k | cf | comm/step | sequential ms | pipeline r=2/4/8 (x) | "
             "adaptive ms (x) | adaptive chose | best fixed (ms) | adaptive vs best | "
             "overlap eff. (adaptive) | sim. error | DeepSpeed ms (x) |",
             "|---" * 16 + "|"]
    for r in rows:
        w, ms, sp = r["workload"], r["ms"], r["speedup_vs_sequential"]
        c = r["adaptive_choice"]
        err = f"{100 * r['simulator_error']:+.0f}%" if r["simulator_error"] is not None else "-"
        lines.append(
            f"| {r['id']} | {w['tokens']} | {w['model_dim']} | {w['hidden_dim']} | {w['top_k']} "
            f"| {w['capacity_factor']} | {r['sequential_comm_ms'] / ms['sequential']:.2f} "
            f"| {ms['sequential']:.0f} | "
            + "/".join(f"{sp[f'nccl r={d}']:.2f}" for d in (2, 4, 8))
            + f" | {ms['adaptive']:.0f} ({sp['adaptive']:.2f}) | {c['algorithm']} r={c['degree']}"
            f" | {r['best_fixed']['config']} ({r['best_fixed']['ms']:.0f}) | "
            f"{100 * r['adaptive_vs_best_fixed']:+.1f}% | "
            f"{r['overlap_efficiency']['adaptive']:.2f} | {err} | "
            f"{ms['deepspeed']:.0f} ({sp['deepspeed']:.2f}) |")
    return "\n".join(lines)


def trials(row: dict) -> list[dict]:
    return row["simulator_error_trials"]


def targets(rows: list[dict]) -> str:
    """The issue's targets, counted over the workloads."""
    comm_bound = [r for r in rows if r["comm_bound"]]
    pipelined = [r for r in rows if r["adaptive_choice"]["degree"] > 1]
    errors = [r["simulator_error"] for r in rows if r["simulator_error"] is not None]
    speedups = [r["speedup_vs_sequential"]["adaptive"] for r in rows]
    lines = [
        f"- adaptive >= 1.3x sequential on communication-bound workloads (comm > compute): "
        f"{sum(r['speedup_vs_sequential']['adaptive'] >= 1.3 for r in comm_bound)} of "
        f"{len(comm_bound)} (speedups "
        + ", ".join(f"#{r['id']} {r['speedup_vs_sequential']['adaptive']:.2f}x"
                    for r in comm_bound) + ")",
        f"- adaptive within 5% of the best fixed configuration: "
        f"{sum(r['adaptive_vs_best_fixed'] <= 0.05 for r in rows)} of {len(rows)}",
        f"- adaptive never more than 3% slower than sequential: "
        f"{sum(s >= 1 / 1.03 for s in speedups)} of {len(rows)} "
        f"(lowest {min(speedups):.2f}x, median {statistics.median(speedups):.2f}x)",
        f"- overlap efficiency >= 0.85 where adaptive pipelines (r > 1): "
        f"{sum(r['overlap_efficiency']['adaptive'] >= 0.85 for r in pipelined)} of "
        f"{len(pipelined)}",
        f"- simulator prediction within 15% of measured (adaptive's choice): "
        f"{sum(abs(e) <= 0.15 for e in errors)} of {len(errors)}; over every tried "
        f"candidate: {sum(abs(t['error']) <= 0.15 for r in rows for t in trials(r))}"
        f" of {sum(len(r['simulator_error_trials']) for r in rows)}",
        f"- DeepSpeed-MoE vs our sequential: median "
        f"{statistics.median(r['speedup_vs_sequential']['deepspeed'] for r in rows):.2f}x; "
        f"adaptive vs DeepSpeed: median "
        f"{statistics.median(r['ms']['deepspeed'] / r['ms']['adaptive'] for r in rows):.2f}x",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, layout: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["nccl r=2", "nccl r=4", "nccl r=8", "adaptive", "deepspeed"]
    best = [r["best_fixed"]["config"] for r in rows]
    fig, ax = plt.subplots(figsize=(13, 4.5))
    width = 0.8 / (len(keys) + 1)
    for i, key in enumerate(keys):
        ax.bar([j + i * width for j in range(len(rows))],
               [r["speedup_vs_sequential"][key] for r in rows], width, label=key)
    ax.bar([j + len(keys) * width for j in range(len(rows))],
           [r["speedup_vs_sequential"][b] for r, b in zip(rows, best)], width,
           label="best fixed (sweep)", color="grey")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([j + 0.4 for j in range(len(rows))])
    ax.set_xticklabels([f"#{r['id']} T{r['workload']['tokens']} M{r['workload']['model_dim']}"
                        f" H{r['workload']['hidden_dim']} k{r['workload']['top_k']}"
                        for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="speedup over sequential (fwd+bwd step)",
           title=f"emulated {describe(layout)}, 1 Gbit/s, gloo on 2 CPU cores")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def describe(layout: str) -> str:
    nodes, ranks, pinned = LAYOUTS[layout]
    return f"{nodes} nodes x {ranks} rank{'s' if ranks > 1 else ''}" + (
        ", a core per node" if pinned else "")


def run_workloads(ids: list[int], steps: int, layout: str) -> list[dict]:
    from schedmoe.tools.emulate import ClusterSpec, EmulatedCluster

    nodes, ranks, pinned = LAYOUTS[layout]
    spec = ClusterSpec(nodes=nodes, ranks_per_node=ranks, rate="1gbit", pin_cores=pinned)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        with EmulatedCluster(spec) as cluster:
            logs = cluster.launch(["experiments.schedule_bench", "--worker", out, "--steps",
                                   str(steps), "--workloads", ",".join(map(str, ids))],
                                  timeout=1200,
                                  env={"PYTHONPATH": str(Path(__file__).parent.parent)})
        print(logs[0], end="", flush=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--workloads", default=",".join(str(i) for i in range(len(WORKLOADS))))
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="2x2")
    p.add_argument("--out", help="results prefix (default: results/schedule_bench, with _2x1 "
                   "for that layout)")
    p.add_argument("--from-json", action="store_true",
                   help="redo the table, targets and plot from OUT.json without running")
    args = p.parse_args()
    ids = [int(i) for i in args.workloads.split(",")]
    if args.worker:
        worker(args.worker, args.steps, ids)
        return
    target = Path(args.out or RESULTS / ("schedule_bench" + (
        "" if args.layout == "2x2" else f"_{args.layout}")))
    if args.from_json:
        saved = json.loads(target.with_suffix(".json").read_text())
        report(saved["rows"], target, saved.get("layout", "2x2"))
        return
    failures: list[dict] = []
    rows = []
    for wid in ids:  # one cluster launch per workload, so a crashed rank costs one workload
        for attempt in range(1, 4):
            try:
                rows.extend(run_workloads([wid], args.steps, args.layout))
                break
            except Exception as exc:  # noqa: BLE001  reported, then retried
                print(f"workload {wid}, attempt {attempt} failed: {str(exc)[-600:]}", flush=True)
                failures.append({"workload": wid, "attempt": attempt, "error": str(exc)})
    rows = summarize(rows)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.with_suffix(".json").write_text(json.dumps(
        {"command": " ".join(["python"] + sys.argv), "layout": args.layout,
         "cluster": describe(args.layout), "rows": rows, "failed_attempts": failures},
        indent=1))
    report(rows, target, args.layout)


def report(rows: list[dict], target: Path, layout: str) -> None:
    text = f"Emulated {describe(layout)}, 1 Gbit/s.\n\n" + markdown(rows) + "\n\n" + \
        targets(rows) + "\n"
    target.with_suffix(".md").write_text(text)
    plot(rows, target.with_suffix(".png"), layout)
    print(text)


if __name__ == "__main__":
    main()
