"""What safe checkpoints cost: `save_checkpoint` / `load_checkpoint` (written aside and renamed,
every stored item hashed, verified before reading, read into fresh tensors) against bare DCP
on the same sharded state (what the earlier checkpoints did).

    python3 experiments/checkpoint_costs.py [ROUNDS]   # ~1 minute on 2 cores, 5 rounds

2 gloo ranks at EP 2, the `schedmoe train` model scaled up (dim 256, 4 layers, 8 experts of
hidden 1024) after one AdamW step: 76 MB of parameters, a 216 MB checkpoint with the optimizer
state. The four variants run interleaved, in a seeded random order per round; a time is the
slowest rank's; medians and their ratios. The files stay in the page cache: this is the cost
of the work added (hashing, fresh buffers, the rename), not of a disk. Writes
experiments/results/checkpoint_costs.json and .png.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("dcp save", "save_checkpoint", "dcp load", "load_checkpoint")


def measure(rank: int, world: int, root: str, rounds: int) -> dict:
    import torch.distributed.checkpoint as dcp

    import schedmoe.parallel as par
    from schedmoe.parallel.checkpoint import _state
    from schedmoe.tools.train.model import MoELM, lm_loss

    layout = par.init_parallel(world)
    torch.manual_seed(0)
    model = MoELM(96, dim=256, layers=4, heads=4, seq=64, hidden_dim=1024, num_experts=8,
                  capacity_factor=0, group=layout.ep_group)
    wrapped = par.data_parallel(model, layout)
    opt = torch.optim.AdamW(wrapped.parameters())
    tokens = torch.randint(0, 96, (4, 64), generator=torch.Generator().manual_seed(rank))
    lm_loss(wrapped, tokens, tokens, 0.01)[0].backward()
    opt.step()
    bytes_ = sum(p.numel() * p.element_size() for p in model.parameters())
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    order = random.Random(0)
    raw, safe = f"{root}/raw", f"{root}/safe"
    dcp.save(_state(wrapped, opt, layout)[0], checkpoint_id=raw)  # something to load first
    par.save_checkpoint(safe, wrapped, opt, layout)
    for _ in range(rounds):
        for variant in order.sample(VARIANTS, len(VARIANTS)):
            dist.barrier()
            t0 = time.perf_counter()
            if variant == "dcp save":
                if rank == 0:
                    shutil.rmtree(raw, ignore_errors=True)
                dist.barrier()
                dcp.save(_state(wrapped, opt, layout)[0], checkpoint_id=raw)
            elif variant == "save_checkpoint":
                par.save_checkpoint(safe, wrapped, opt, layout)
            elif variant == "dcp load":
                dcp.load(_state(wrapped, opt, layout)[0], checkpoint_id=raw)
            else:
                par.load_checkpoint(safe, wrapped, opt, layout)
            elapsed = torch.tensor(time.perf_counter() - t0)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[variant].append(float(elapsed) * 1e3)
    return {"times_ms": times, "parameter_bytes": bytes_ * world,
            "checkpoint_bytes": sum(f.stat().st_size for f in Path(safe).iterdir())}


def main() -> None:
    from schedmoe.tools.testing import run_ranks

    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    with tempfile.TemporaryDirectory() as root:
        result = run_ranks(measure, 2, root, rounds, timeout=1200, collective_timeout=300)[0]
    medians = {v: statistics.median(t) for v, t in result["times_ms"].items()}
    result.update(medians_ms=medians, rounds=rounds,
                  save_ratio=medians["save_checkpoint"] / medians["dcp save"],
                  load_ratio=medians["load_checkpoint"] / medians["dcp load"],
                  command="python3 experiments/checkpoint_costs.py")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "checkpoint_costs.json").write_text(json.dumps(result, indent=1))
    for v in VARIANTS:
        print(f"{v:16s} median {medians[v]:8.1f} ms  ({result['times_ms'][v]})")
    print(f"save {result['save_ratio']:.2f}x bare DCP, load {result['load_ratio']:.2f}x; "
          f"checkpoint {result['checkpoint_bytes'] / 1e6:.0f} MB")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(VARIANTS, [medians[v] for v in VARIANTS],
           color=["#999", "#36c", "#999", "#36c"])
    for i, v in enumerate(VARIANTS):
        ax.plot([i] * len(result["times_ms"][v]), result["times_ms"][v], "k.", markersize=4)
    ax.set_ylabel("ms (slowest of 2 ranks)")
    ax.set_title(f"checkpoint of {result['checkpoint_bytes'] / 1e6:.0f} MB, 2 gloo ranks: "
                 f"save {result['save_ratio']:.2f}x, load {result['load_ratio']:.2f}x bare DCP",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "checkpoint_costs.png", dpi=120)


if __name__ == "__main__":
    main()
