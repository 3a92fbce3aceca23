"""Overlap across micro-batches and with the data-parallel all-reduce, on the emulated cluster
(2 nodes x 1 rank, a core each, links at 1 Gbit/s or `--rate`).

    python3 experiments/overlap_bench.py [--rate 500mbit]   # root; ~6 min on 2 cores
                                                   # results/overlap_bench_RATE.{json,png}

The model: 4 pre-norm transformer blocks (8-head attention, MoE FFN: 8 experts, top-2,
capacity factor 1.25), M 512, H 256, fp32, seq 256; EP over both ranks. Every figure is a
training step (forward + backward, no optimizer) of the slowest rank; each variant runs WARMUP
untimed steps, then STEPS steps per round, the variants interleaved, ROUNDS rounds; the figure
is the median over every step of every round.

Part 1, two micro-batches of 2 sequences per rank (1,024 tokens each):
  one after the other with every layer `sequential`, then `pipeline(r)` for r in 2, 4 (the
  per-layer pipelined schedule); `interleaved_step` with `sequential` and `pipeline(2)` layers;
  the same with padded rows (`ragged=False`, whose per-call agreement rides on the first
  dispatch instead of being a blocking all-gather of its own): pipeline r=4 one by one and
  sequential interleaved.
Part 2, EP x DP (dense gradients data parallel over both ranks, through the same link), a
batch of 4 sequences per rank, layers `pipeline(2)`: DDP's default buckets
(`schedmoe.parallel.data_parallel`) against GradSync (1 MB chunks, 2 in flight), GradSync with
8 in flight, chunks sent as soon as ready (8 in flight, not waiting for the link: the
priority's ablation), and GradSync with the batch as two interleaved micro-batches.
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
M, H, E, HEADS, SEQ, VOCAB, LAYERS = 512, 256, 8, 8, 256, 256, 4
STEPS, ROUNDS, WARMUP = 5, 3, 3


def worker(out_path: str) -> None:
    import torch
    import torch.distributed as dist

    import schedmoe.parallel as par
    from schedmoe.overlap import GradSync, interleaved_step
    from schedmoe.schedulers import PipelineScheduler, SequentialScheduler
    from schedmoe.comm.topology import release
    from schedmoe.tools.train.model import MoELM, lm_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    layout = par.init_parallel(dist.get_world_size())

    def build(ragged: bool = True) -> MoELM:
        torch.manual_seed(0)
        return MoELM(VOCAB, dim=M, layers=LAYERS, heads=HEADS, seq=SEQ, hidden_dim=H,
                     num_experts=E, top_k=2, capacity_factor=1.25, group=layout.ep_group,
                     ragged=ragged)

    def schedule(model: MoELM, scheduler) -> None:
        for block in model.blocks:
            block.moe.scheduler = scheduler

    gen = torch.Generator().manual_seed(rank)
    batch = torch.randint(VOCAB, (4, SEQ + 1), generator=gen)
    x, y = batch[:, :-1], batch[:, 1:]
    halves = list(zip(x.chunk(2), y.chunk(2)))

    plain, padded = build(), build(ragged=False)
    ddp_model = build()
    ddp = par.data_parallel(ddp_model, layout)
    synced, synced2, wide, eager = build(), build(), build(), build()
    sync, sync2 = GradSync(synced, layout), GradSync(synced2, layout, micro_batches=2)
    sync_wide = GradSync(wide, layout, window=8)
    sync_eager = GradSync(eager, layout, window=8, wait_for_link=False)
    for model in (ddp_model, synced, synced2, wide, eager):
        schedule(model, PipelineScheduler(2))

    def one_by_one(scheduler, model=plain):
        def run():
            schedule(model, scheduler)
            for part in halves:
                lm_loss(model, *part, 0.01)[0].backward()
        return run

    def interleaved(scheduler, model=plain):
        def run():
            schedule(model, scheduler)
            interleaved_step(lambda part: lm_loss(model, *part, 0.01)[0], halves)
        return run

    def with_ddp():
        lm_loss(ddp, x, y, 0.01)[0].backward()

    def with_sync(model, synchroniser):
        def run():
            lm_loss(model, x, y, 0.01)[0].backward()
            synchroniser.finish()
        return run

    def with_sync_interleaved():
        interleaved_step(lambda part: lm_loss(synced2, *part, 0.01)[0] / 2, halves)
        sync2.finish()

    variants = {
        "one by one, sequential": one_by_one(SequentialScheduler()),
        "one by one, pipeline r=2": one_by_one(PipelineScheduler(2)),
        "one by one, pipeline r=4": one_by_one(PipelineScheduler(4)),
        "interleaved, sequential": interleaved(SequentialScheduler()),
        "interleaved, pipeline r=2": interleaved(PipelineScheduler(2)),
        "padded, one by one, pipeline r=4": one_by_one(PipelineScheduler(4), padded),
        "padded, interleaved, sequential": interleaved(SequentialScheduler(), padded),
        "EP x DP, DDP buckets": with_ddp,
        "EP x DP, GradSync": with_sync(synced, sync),
        "EP x DP, GradSync window 8": with_sync(wide, sync_wide),
        "EP x DP, chunks as soon as ready": with_sync(eager, sync_eager),
        "EP x DP, GradSync + interleaved": with_sync_interleaved,
    }

    def timed(run) -> float:
        for model in (plain, padded, ddp_model, synced, synced2, wide, eager):
            model.zero_grad(set_to_none=True)
        dist.barrier()
        began = time.perf_counter()
        run()
        took = torch.tensor([time.perf_counter() - began])
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        return 1e3 * took.item()

    for run in variants.values():  # warm-up (a new variant's first steps run slow)
        for _ in range(WARMUP):
            timed(run)
    ms: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, run in variants.items():
            ms[name] += [timed(run) for _ in range(STEPS)]
    # How long the exchanges are against the rest: one sequential step's A2A intervals.
    schedule(plain, SequentialScheduler())
    exchange_ms = 0.0
    for part in halves:
        lm_loss(plain, *part, 0.01)[0].backward()
        exchange_ms += sum(v for block in plain.blocks
                           for k, v in block.moe.last_stats.op_ms.items() if k.endswith(".a2a"))
    if rank == 0:
        Path(out_path).write_text(json.dumps({
            "ms": {name: statistics.median(v) for name, v in ms.items()},
            "all_ms": ms, "sequential_exchange_ms_rank0": exchange_ms}))
    for synchroniser in (sync, sync2, sync_wide, sync_eager):
        synchroniser.close()
    release()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("--rate", default="1gbit", help="each node's link (tc rate), default 1gbit")
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
        return
    from schedmoe.tools.emulate import ClusterSpec, EmulatedCluster

    spec = ClusterSpec(nodes=2, ranks_per_node=1, rate=args.rate, pin_cores=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        with EmulatedCluster(spec) as cluster:
            cluster.launch(["experiments.overlap_bench", "--worker", out], timeout=1500,
                           env={"PYTHONPATH": str(Path(__file__).parent.parent)})
        result = json.loads(Path(out).read_text())
    ms = result["ms"]
    part1 = {name: v for name, v in ms.items() if not name.startswith("EP x DP")}
    per_layer = min(v for name, v in part1.items() if "one by one, pipeline" in name)
    best_interleaved = min(v for name, v in part1.items() if "interleaved" in name)
    result.update(
        command=f"python3 experiments/overlap_bench.py --rate {args.rate}",
        cluster=f"emulated 2 nodes x 1 rank, a core per node, links at {args.rate}",
        config={"model_dim": M, "hidden_dim": H, "experts": E, "heads": HEADS, "seq": SEQ,
                "layers": LAYERS, "steps": STEPS, "rounds": ROUNDS, "warmup": WARMUP},
        ratios={
            "interleaved (best) / best per-layer pipelined": per_layer / best_interleaved,
            "interleaved (best) / one by one, sequential":
                ms["one by one, sequential"] / best_interleaved,
            "GradSync / DDP": ms["EP x DP, DDP buckets"] / ms["EP x DP, GradSync"],
            "GradSync window 8 / DDP":
                ms["EP x DP, DDP buckets"] / ms["EP x DP, GradSync window 8"],
            "chunks as soon as ready / DDP":
                ms["EP x DP, DDP buckets"] / ms["EP x DP, chunks as soon as ready"],
            "GradSync + interleaved / DDP":
                ms["EP x DP, DDP buckets"] / ms["EP x DP, GradSync + interleaved"]})
    RESULTS.mkdir(exist_ok=True)
    name = f"overlap_bench_{args.rate}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot(result, name)
    for name, value in ms.items():
        print(f"{name:36s} {value:8.1f} ms")
    for name, value in result["ratios"].items():
        print(f"{name}: {value:.2f}x")
    print(f"exchanges in a sequential step (rank 0): {result['sequential_exchange_ms_rank0']:.0f}"
          " ms")


def plot(result: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["ms"])
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh(range(len(names)), [result["ms"][n] for n in names],
            xerr=[[result["ms"][n] - min(result["all_ms"][n]) for n in names],
                  [max(result["all_ms"][n]) - result["ms"][n] for n in names]],
            color=["tab:blue" if "interleaved" in n or "GradSync" in n else "tab:gray"
                   for n in names])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("training step, ms (median; bars: min-max)")
    ax.set_title(result["cluster"], fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
