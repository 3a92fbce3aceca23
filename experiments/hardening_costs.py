"""What the hardening of issue 10 costs: the per-call agreement, and payload checksums.

    python3 experiments/hardening_costs.py            # ~4 minutes on 2 cores

1. Agreement: 4 gloo CPU ranks, the default layer at T = 256 tokens per rank, forward +
   backward. Three variants interleaved in one run (seeded random order within each round):
   the default (the record rides on the first dispatch), the record swapped by its own
   all-gather every call, and the agreement bypassed
   (valid here only: every rank has the same T, so the capacity is known without it). A step's
   time is the slowest rank's; the cost is the median over rounds of (variant - bypassed) in
   the same round, with its quartiles; the time inside the "agree" op is reported too.
2. Checksums (`verify=True`): compress + decompress of one dispatch payload of the default
   bench (8 experts x 320 slots x 512 fp32 = 5 MiB) per codec, with and without, interleaved,
   one thread.

Writes experiments/results/hardening_costs.json and .png.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


VARIANTS = ("rider", "collective", "bypassed")


def agreement_rank(rank: int, world: int, tokens: int, steps: int) -> dict:
    import schedmoe
    from schedmoe.control.agreement import Agreed

    torch.manual_seed(0)
    # padded rows: the record can ride (the setting of the committed results; ragged rows,
    # the default since, swap split sizes every call and never ride)
    layer = schedmoe.MoELayer(512, 8, 1024, 2, 1.25, ragged=False)
    x = torch.randn(tokens, 512, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    real_agree, real_can_guess = layer._agreement.agree, layer._can_guess

    def bypass(local, device, counts=None):  # valid here only: same T and config everywhere
        return Agreed(local.limit, local.input_grad, (), local.dtype)

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    times["rider_agree_ms"], times["collective_agree_ms"], times["rode"] = [], [], []
    # Each round runs every variant once, in an order drawn from a seeded RNG (the same on
    # every rank), so no variant always follows the same one.
    order = random.Random(0)
    schedule = [v for _ in range(steps + 2) for v in order.sample(VARIANTS, len(VARIANTS))]
    for i, variant in enumerate(schedule):
        # rider: the default (the record rides on the first dispatch once calls repeat);
        # collective: the record swapped by its own all-gather every call; bypassed: neither.
        layer._can_guess = real_can_guess if variant == "rider" else (lambda: False)
        layer._agreement.agree = bypass if variant == "bypassed" else real_agree
        rides = variant == "rider" and layer._can_guess()
        t0 = time.perf_counter()
        y = layer(x)
        (y.square().mean() + 0.01 * y.l_aux).backward()
        elapsed = torch.tensor([1e3 * (time.perf_counter() - t0)])
        torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
        if i >= 2 * len(VARIANTS):
            times[variant].append(float(elapsed))
            if variant != "bypassed":
                times[variant + "_agree_ms"].append(layer.last_stats.op_ms["agree"])
            if variant == "rider":
                times["rode"].append(rides)
    return times


def agreement_cost(tokens: int = 256, steps: int = 150) -> dict:
    from schedmoe.tools.testing import run_ranks

    times = run_ranks(agreement_rank, 4, tokens, steps, timeout=900)[0]  # slowest-rank steps
    step = {name: statistics.median(times[name]) for name in VARIANTS}
    result = {"tokens_per_rank": tokens, "ranks": 4, "rounds": steps, "step_ms": step,
              "rider_calls_that_rode": sum(times["rode"]), "cost_ms": {}, "cost_share": {},
              "paired_cost_ms_quartiles": {}}
    for name in ("rider", "collective"):
        # Paired: the variant's step minus the bypassed step of the same round, whose order is
        # random; the median of these differences is robust to the machine's slow drifts.
        diffs = [a - b for a, b in zip(times[name], times["bypassed"])]
        q1, median, q3 = statistics.quantiles(diffs, n=4)
        result["cost_ms"][name] = median
        result["cost_share"][name] = median / step[name]
        result["paired_cost_ms_quartiles"][name] = [q1, q3]
    result["inside_agree_op_ms"] = {name: statistics.median(times[name + "_agree_ms"])
                                    for name in ("rider", "collective")}
    return result


def checksum_cost(repeats: int = 15) -> list[dict]:
    from schedmoe.ops.codecs.codec_set import CodecSet
    from schedmoe.ops.codecs.compressor import SliceSpec

    torch.set_num_threads(1)
    x = torch.randn(4, 2, 320, 512, generator=torch.Generator().manual_seed(0))
    spec = SliceSpec(tuple(x.shape[1:]), x.dtype)
    rows = []
    for name in ("none", "bf16", "int8", "fp8", "zstd"):
        codecs = {verify: CodecSet.build(name, verify=verify).stream("dispatch")
                  for verify in (False, True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(2 * repeats + 2):
            verify = bool(i % 2)
            t0 = time.perf_counter()
            codecs[verify].decompress(codecs[verify].compress(x), spec)
            if i >= 2:
                times[verify].append(1e3 * (time.perf_counter() - t0))
        plain, checked = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"codec": name, "payload_bytes": x.numel() * 4, "plain_ms": plain,
                     "verify_ms": checked, "ratio": checked / plain})
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    agree = result["agreement"]
    a.bar(list(VARIANTS), [agree["step_ms"][name] for name in VARIANTS])
    a.set_ylabel("median step, slowest rank (ms)")
    share = agree["cost_share"]
    a.set_title(f"4 CPU ranks, T={agree['tokens_per_rank']}: agreement costs "
                f"{100 * share['rider']:.1f}% (rider), {100 * share['collective']:.1f}% "
                "(own all-gather)", fontsize=9)
    rows = result["checksums"]
    names = [r["codec"] for r in rows]
    xs = range(len(rows))
    b.bar([i - 0.2 for i in xs], [r["plain_ms"] for r in rows], 0.4, label="plain")
    b.bar([i + 0.2 for i in xs], [r["verify_ms"] for r in rows], 0.4, label="verify=True")
    b.set_xticks(list(xs), names)
    b.set_ylabel("compress + decompress, 5 MiB (ms)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    result = {"command": "python3 experiments/hardening_costs.py",
              "torch": torch.__version__, "machine": "2 CPU cores, gloo",
              "agreement": agreement_cost(), "checksums": checksum_cost()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hardening_costs.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "hardening_costs.png")
    json.dump(result, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
