"""What the hardening of issue 10 costs: the per-call agreement, and payload checksums.

    python3 experiments/hardening_costs.py            # ~3 minutes on 2 cores

1. Agreement: 4 gloo CPU ranks, the default layer at T = 256 tokens per rank, forward +
   backward. Steps with the agreement and steps with it bypassed (every rank has the same T,
   so the capacity is known without it) alternate in one run; the cost is the difference of
   the median step times of the slowest rank. The time spent inside the agreement (the
   collective, waiting for peers included) is reported too.
2. Checksums (`verify=True`): compress + decompress of one dispatch payload of the default
   bench (8 experts x 320 slots x 512 fp32 = 5 MiB) per codec, with and without, interleaved,
   one thread.

Writes experiments/results/hardening_costs.json and .png.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def agreement_rank(rank: int, world: int, tokens: int, steps: int) -> dict:
    import schedmoe
    from schedmoe.agreement import Agreed

    torch.manual_seed(0)
    layer = schedmoe.MoELayer(512, 8, 1024, 2, 1.25)
    x = torch.randn(tokens, 512, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    real = layer._agreement.agree

    def bypass(local, device):  # valid here only: every rank has the same T and config
        return Agreed(local.limit, local.input_grad, ())

    times: dict[str, list[float]] = {"with": [], "without": [], "agree_ms": []}
    for i in range(2 * steps + 4):
        variant = "with" if i % 2 == 0 else "without"
        layer._agreement.agree = real if variant == "with" else bypass
        t0 = time.perf_counter()
        y = layer(x)
        (y.square().mean() + 0.01 * y.l_aux).backward()
        elapsed = torch.tensor([1e3 * (time.perf_counter() - t0)])
        torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
        if i >= 4:
            times[variant].append(float(elapsed))
            if variant == "with":
                times["agree_ms"].append(layer.last_stats.op_ms["agree"])
    return times


def agreement_cost(tokens: int = 256, steps: int = 40) -> dict:
    from schedmoe.testing import run_ranks

    per_rank = run_ranks(agreement_rank, 4, tokens, steps, timeout=900)
    with_ms = statistics.median(per_rank[0]["with"])
    without_ms = statistics.median(per_rank[0]["without"])
    inside = [statistics.median(r["agree_ms"]) for r in per_rank]
    return {"tokens_per_rank": tokens, "ranks": 4, "steps_each": steps,
            "step_with_ms": with_ms, "step_without_ms": without_ms,
            "cost_ms": with_ms - without_ms, "cost_share": (with_ms - without_ms) / with_ms,
            "inside_agreement_ms_per_rank": inside,
            "inside_share_per_rank": [ms / with_ms for ms in inside]}


def checksum_cost(repeats: int = 15) -> list[dict]:
    from schedmoe.ops.codec_set import CodecSet
    from schedmoe.ops.compressor import SliceSpec

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
    a.bar(["with agreement", "bypassed"], [agree["step_with_ms"], agree["step_without_ms"]])
    a.set_ylabel("median step, slowest rank (ms)")
    a.set_title(f"4 CPU ranks, T={agree['tokens_per_rank']}: cost {agree['cost_ms']:.2f} ms "
                f"({100 * agree['cost_share']:.1f}%)", fontsize=9)
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
