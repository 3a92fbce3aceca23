"""Codecs on realistic payloads: ratio, error, throughput, A2A time, and convergence.

    python experiments/compression.py                     # all three parts (a2a needs root)
    python experiments/compression.py --parts codecs,convergence --steps 300

Parts:
- codecs: each codec on gelu and relu activations and on dispatch payloads captured from the
  tiny MoE LM after a few training steps, in fp32 and bf16: compression ratio, relative error
  (norm of the error / norm of the payload; max error / max |payload|), compress and decompress
  throughput (MB of payload per second, median of 5, one thread).
- a2a: compress -> exchange -> decompress of an 8 MiB-per-rank relu payload on the emulated
  2 nodes x 2 ranks at 1 Gbit/s, per codec (median of 5, slowest rank).
- convergence: the tiny LM trained from the same init on the same batches, per codec.

Writes experiments/results/compression_{codecs,a2a,convergence}.json and compression.png.
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

import torch

sys.path.insert(0, str(Path(__file__).parent))
RESULTS = Path(__file__).parent / "results"
CODECS = ["none", "fp16", "bf16", "int8", "fp8", "zstd"]
CONVERGENCE_CODECS = CODECS + [{"dispatch": "int8", "combine": "int8",
                                "dispatch_grad": "int8+ef", "combine_grad": "int8+ef"}]


def label(spec) -> str:
    return spec if isinstance(spec, str) else "int8 (grads +ef)"


def captured_dispatch_payloads(steps: int = 20) -> torch.Tensor:
    """The first MoE layer's dispatch payload [P, E, C, M] after `steps` training steps."""
    import tiny_lm
    from schedmoe.ops import NoCompression

    class Capture(NoCompression):
        last: torch.Tensor | None = None

        def compress(self, x_P):
            Capture.last = x_P.detach().clone()
            return super().compress(x_P)

    tiny_lm.train({"dispatch": Capture()}, steps=steps)
    return Capture.last


def payloads() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(4, 2, 512, 512, generator=g)  # [P, E, C, M]: 16 MiB in fp32
    return {"gelu": torch.nn.functional.gelu(pre), "relu": torch.relu(pre),
            "dispatch (tiny LM)": captured_dispatch_payloads()}


def measure_codec(name: str, x: torch.Tensor, reps: int = 5) -> dict:
    from schedmoe.ops import SliceSpec
    from schedmoe.ops.codecs.codec_set import make_codec

    codec = make_codec(name)
    spec = SliceSpec(tuple(x.shape[1:]), x.dtype)
    t_c, t_d = [], []
    for _ in range(reps):
        start = time.perf_counter()
        wire = codec.compress(x)
        t_c.append(time.perf_counter() - start)
        start = time.perf_counter()
        y = codec.decompress(wire, spec)
        t_d.append(time.perf_counter() - start)
    nbytes = x.numel() * x.element_size()
    err = (y.float() - x.float())
    return {
        "ratio": nbytes / wire.data.numel(),
        "rel_error_norm": (err.norm() / x.float().norm()).item(),
        "rel_error_max": (err.abs().max() / x.float().abs().max()).item(),
        "compress_MBps": nbytes / 1e6 / statistics.median(t_c),
        "decompress_MBps": nbytes / 1e6 / statistics.median(t_d),
    }


def part_codecs() -> dict:
    torch.set_num_threads(1)
    out = {}
    for kind, x in payloads().items():
        for dtype in (torch.float32, torch.bfloat16):
            key = f"{kind} {str(dtype).replace('torch.', '')}"
            out[key] = {name: measure_codec(name, x.to(dtype)) for name in CODECS}
            print(key, {n: f"{r['ratio']:.2f}x" for n, r in out[key].items()}, flush=True)
    return out


def a2a_worker(out_path: str, reps: int) -> None:
    import torch.distributed as dist
    from schedmoe.comm.groups import EPGroup
    from schedmoe.exchange.send import send
    from schedmoe.ops.codecs.codec_set import make_codec
    from schedmoe.control.recorder import StepRecorder
    from schedmoe.registry import registry

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    group = EPGroup.resolve(None)
    a2a = registry("a2a").get("nccl")(group)
    g = torch.Generator().manual_seed(group.rank)
    base = torch.relu(torch.randn(group.size, 2, 512, 512, generator=g))  # 8 MiB fp32 (P=4)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = base.to(dtype)
        for name in CODECS:
            codec = make_codec(name)
            send(x, a2a, codec, StepRecorder(), "warmup")
            total, comm = [], []
            for _ in range(reps):
                rec = StepRecorder()
                dist.barrier()
                start = time.perf_counter()
                send(x, a2a, codec, rec, "x")
                t = torch.tensor([time.perf_counter() - start, rec.seconds["x.a2a"]])
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                total.append(t[0].item())
                comm.append(t[1].item())
            key = f"{name} {str(dtype).replace('torch.', '')}"
            results[key] = {"total_s": statistics.median(total), "a2a_s": statistics.median(comm),
                            "wire_ratio": rec.bytes["x"][0] / rec.bytes["x"][1]}
            if group.rank == 0:
                print(key, {k: round(v, 4) for k, v in results[key].items()}, flush=True)
    if group.rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def part_a2a(reps: int) -> dict:
    from schedmoe.tools.emulate import ClusterSpec, EmulatedCluster

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "a2a.json")
        with EmulatedCluster(ClusterSpec(nodes=2, ranks_per_node=2, rate="1gbit")) as cluster:
            logs = cluster.launch(["experiments.compression", "--a2a-worker", out,
                                   "--reps", str(reps)], timeout=1800,
                                  env={"PYTHONPATH": str(Path(__file__).parent.parent)})
        print(logs[0], end="")
        return {"layout": "2 nodes x 2 ranks, 1gbit, nccl (flat) A2A, 8 MiB relu per rank (fp32)",
                "results": json.loads(Path(out).read_text())}


def part_convergence(steps: int) -> dict:
    import tiny_lm

    torch.set_num_threads(2)
    curves = {}
    for spec in CONVERGENCE_CODECS:
        start = time.perf_counter()
        curves[label(spec)] = tiny_lm.train(spec, steps=steps)
        print(f"{label(spec)}: final {statistics.mean(curves[label(spec)][-20:]):.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    base = statistics.mean(curves["none"][-20:])
    final = {k: statistics.mean(v[-20:]) for k, v in curves.items()}
    return {"steps": steps, "final_loss_last20": final,
            "relative_to_none": {k: v / base - 1 for k, v in final.items()}, "curves": curves}


def plot(codecs: dict | None, a2a: dict | None, conv: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    if codecs:
        kinds = [k for k in codecs if k != "command"]
        width = 0.8 / len(CODECS)
        for i, name in enumerate(CODECS):
            axes[0].bar([k + i * width for k in range(len(kinds))],
                        [codecs[k][name]["ratio"] for k in kinds], width, label=name)
        axes[0].set_xticks([k + 0.4 - width / 2 for k in range(len(kinds))])
        axes[0].set_xticklabels(kinds, rotation=20, ha="right", fontsize=7)
        axes[0].set(ylabel="compression ratio", title="wire bytes: payload / compressed")
        axes[0].legend(fontsize=7)
    if a2a:
        res = a2a["results"]
        for j, dtype in enumerate(("float32", "bfloat16")):
            keys = [f"{n} {dtype}" for n in CODECS]
            axes[1].bar([i + 0.4 * j for i in range(len(CODECS))],
                        [1e3 * res[k]["total_s"] for k in keys], 0.4, label=f"{dtype} total")
            axes[1].bar([i + 0.4 * j for i in range(len(CODECS))],
                        [1e3 * res[k]["a2a_s"] for k in keys], 0.4, fill=False, hatch="//",
                        label=f"{dtype} of which A2A")
        axes[1].set_xticks([i + 0.2 for i in range(len(CODECS))])
        axes[1].set_xticklabels(CODECS)
        axes[1].set(ylabel="ms", title="compress+A2A+decompress, 2x2 @ 1 Gbit/s (8 MiB/rank fp32, 4 MiB bf16)")
        axes[1].legend(fontsize=7)
    if conv:
        for name, curve in conv["curves"].items():
            smooth = [statistics.mean(curve[max(0, i - 9):i + 1]) for i in range(len(curve))]
            axes[2].plot(smooth, label=name, lw=1)
        axes[2].set(xlabel="step", ylabel="training loss (10-step mean)",
                    title="tiny MoE LM, same init and batches", ylim=(1.0, 3.5))
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", default="codecs,a2a,convergence")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--a2a-worker", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.a2a_worker:
        a2a_worker(args.a2a_worker, args.reps)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    loaded = {}
    for part, run in (("codecs", part_codecs), ("a2a", lambda: part_a2a(args.reps)),
                      ("convergence", lambda: part_convergence(args.steps))):
        path = RESULTS / f"compression_{part}.json"
        if part in parts:
            loaded[part] = run()
            loaded[part]["command"] = " ".join(["python"] + sys.argv)
            path.write_text(json.dumps(loaded[part], indent=1))
        elif path.exists():
            loaded[part] = json.loads(path.read_text())
    plot(loaded.get("codecs"), loaded.get("a2a"), loaded.get("convergence"),
         RESULTS / "compression.png")


if __name__ == "__main__":
    main()
