"""A2A algorithms side by side on an emulated cluster: time vs message size, speedup over flat.

    python experiments/a2a_bench.py                 # 2x2, 4x1 and 1x4 ranks at 1 Gbit/s (root)
    python experiments/a2a_bench.py --layouts 2x2 --reps 7

Writes experiments/results/a2a_bench.json and .png. Sizes are bytes each rank sends in one
exchange (all peers together). Every repetition times all algorithms back to back (round robin)
and takes the slowest rank's time; the figure is the median over repetitions. The bound is the
inter-node bytes each node must push through its link divided by the link rate (the L ranks of
a node share one NIC in this emulation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
ALGOS = ["nccl", "2dh", "pipe"]  # results/a2a_bench.json also has the removed "2dh-pipe"
ROW_BYTES = 1024


def tc_rate_bytes(rate: str) -> float:
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale / 8
    raise ValueError(f"unsupported rate {rate!r} (use e.g. 1gbit, 500mbit)")


def worker(out_path: str, reps: int) -> None:
    """One rank, launched by torchrun inside a node namespace."""
    import torch
    import torch.distributed as dist
    from schedmoe.comm.groups import EPGroup
    from schedmoe.registry import registry

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    group = EPGroup.resolve(None)
    world = group.size
    algos = {name: registry("a2a").get(name)(group) for name in ALGOS}
    for algo in algos.values():
        _ = algo.topology  # build the sub-groups before timing
    rows_per_peer = {size: max(1, size // ROW_BYTES // world) for size in SIZES}
    results = {name: {} for name in ALGOS}
    for size in SIZES:
        x = torch.randn(world * rows_per_peer[size], ROW_BYTES // 4)
        reference = algos["nccl"].exchange(x)
        for name, algo in algos.items():  # warm-up and a correctness check
            assert torch.equal(algo.exchange(x), reference), name
        times = {name: [] for name in ALGOS}
        for _ in range(reps):
            for name, algo in algos.items():
                dist.barrier()
                start = time.perf_counter()
                algo.exchange(x)
                elapsed = torch.tensor([time.perf_counter() - start])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                times[name].append(elapsed.item())
        for name in ALGOS:
            results[name][str(size)] = times[name]
        if group.rank == 0:
            print(f"size {size >> 10} KiB: " + ", ".join(
                f"{n} {1e3 * statistics.median(t):.1f} ms" for n, t in times.items()), flush=True)
    if group.rank == 0:
        Path(out_path).write_text(json.dumps({"world": world, "times": results}))
    dist.destroy_process_group()


def run_layout(nodes: int, ranks: int, rate: str, reps: int) -> dict:
    from schedmoe.tools.emulate import ClusterSpec, EmulatedCluster

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        with EmulatedCluster(ClusterSpec(nodes=nodes, ranks_per_node=ranks, rate=rate)) as c:
            logs = c.launch(["experiments.a2a_bench", "--worker", out, "--reps", str(reps)],
                            timeout=1800, env={"PYTHONPATH": str(Path(__file__).parent.parent)})
        print(logs[0], end="")
        raw = json.loads(Path(out).read_text())
    world = nodes * ranks
    rows = []
    for size in SIZES:
        inter_node_bytes = ranks * size * (world - ranks) / world  # per node, per direction
        bound = inter_node_bytes / tc_rate_bytes(rate)
        medians = {a: statistics.median(raw["times"][a][str(size)]) for a in ALGOS}
        rows.append({
            "bytes_per_rank": size, "bytes_per_peer": size // world,
            "median_s": medians,
            "speedup_vs_flat": {a: medians["nccl"] / medians[a] for a in ALGOS},
            "bound_s": bound,
            "bound_ratio": {a: (medians[a] / bound if bound else None) for a in ALGOS},
            "all_s": {a: raw["times"][a][str(size)] for a in ALGOS},
        })
    return {"nodes": nodes, "ranks_per_node": ranks, "rate": rate, "reps": reps, "rows": rows}


def plot(layouts: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(layouts), figsize=(5 * len(layouts), 8), squeeze=False)
    for col, lay in enumerate(layouts):
        sizes = [r["bytes_per_rank"] / 2**20 for r in lay["rows"]]
        top, bottom = axes[0][col], axes[1][col]
        for algo in ALGOS:
            top.plot(sizes, [1e3 * r["median_s"][algo] for r in lay["rows"]], marker="o",
                     label=algo)
            bottom.plot(sizes, [r["speedup_vs_flat"][algo] for r in lay["rows"]], marker="o",
                        label=algo)
        if any(r["bound_s"] for r in lay["rows"]):
            top.plot(sizes, [1e3 * r["bound_s"] for r in lay["rows"]], "k--",
                     label="inter-node bound")
        title = f"{lay['nodes']} nodes x {lay['ranks_per_node']} ranks, {lay['rate']}"
        top.set(title=title, xscale="log", yscale="log", xlabel="MiB sent per rank",
                ylabel="median time (ms)")
        bottom.set(xscale="log", xlabel="MiB sent per rank", ylabel="speedup over flat (nccl)")
        bottom.axhline(1.0, color="grey", lw=0.8)
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(layouts: list[dict]) -> str:
    lines = []
    for lay in layouts:
        lines.append(f"\n{lay['nodes']} nodes x {lay['ranks_per_node']} ranks, {lay['rate']} "
                     f"(median of {lay['reps']}, ms; x = speedup over flat; bound = inter-node "
                     "bytes per node / rate)\n")
        lines.append("| MiB/rank | KiB/peer | " + " | ".join(ALGOS) + " | bound |")
        lines.append("|---" * (len(ALGOS) + 3) + "|")
        for r in lay["rows"]:
            cells = [f"{1e3 * r['median_s'][a]:.1f} ({r['speedup_vs_flat'][a]:.2f}x)"
                     for a in ALGOS]
            lines.append(f"| {r['bytes_per_rank'] / 2**20:g} | {r['bytes_per_peer'] >> 10} | "
                         + " | ".join(cells) + f" | {1e3 * r['bound_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("--layouts", default="2x2,4x1,1x4", help="NODESxRANKS, comma separated")
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS / "a2a_bench"))
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.reps)
        return
    layouts = []
    for spec in args.layouts.split(","):
        nodes, ranks = map(int, spec.split("x"))
        print(f"== {nodes} x {ranks} at {args.rate}", flush=True)
        layouts.append(run_layout(nodes, ranks, args.rate, args.reps))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": " ".join(["python"] + sys.argv), "layouts": layouts}, indent=1))
    plot(layouts, out.with_suffix(".png"))
    table = markdown(layouts)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
