"""Everything the layer must show on one GPU, verified and measured by one command in at most
7 minutes (the project's GPU machine is lent about 15 minutes at a time, start-up included).

    python experiments/gpu_check.py              # on a GPU: experiments/results/gpu/
    python experiments/gpu_check.py --dry-run    # the same code paths on CPU tensors (CI)

Checks, in order (each one's result is written as soon as it ends, so a run cut short keeps
what it did):
1. `agree`: CUDA == CPU (fp32) for every scheduler x codec, padded and ragged, forward and
   backward: relative error of the output and every gradient (1e-5; a lossy codec may flip one
   quantisation step where the devices' fp32 GEMMs round apart, so it reports, with 1e-3).
2. `syncs`: `torch.cuda.set_sync_debug_mode("error")` around fixed-capacity steps of every
   scheduler x codec: zero host syncs; dropless (ragged) steps counted: 1 each, the split sizes.
3. `sanitizer`: the CUDA stream sanitizer (`TORCH_CUDA_SANITIZER=1`, in a subprocess) over
   pipelined and adaptive steps, staged and flat exchanges, shared experts, interleaved
   micro-batches: no unsynchronised access.
4. `trace`: a `torch.profiler` trace of a pipelined step (one rank, staged exchange, r = 4):
   kernels and copies by stream, the time two or more streams were busy at once, and the step
   time against the sequential schedule's (Chrome trace `trace_pipeline.json`).
5. `codecs`: int8/fp8 pack and unpack GB/s against the device-to-device copy measured in the
   same run (target >= 70%), fp32 and bf16 in.
6. `speed`: layer forward + backward in bf16 at Mixtral-like sizes (M 4096, H 14336, 8
   experts, top-2, 8192 tokens): tokens/s and useful-FLOP utilisation against `torch.mm` of the
   same shapes (target >= 60%), and against a plain PyTorch MoE (sort tokens, a matmul per
   expert), all in the same run.

With `--dry-run` the "device" is the CPU and the layer runs on the checking lanes
(schedmoe/streams/checking.py), which apply the stream sanitizer's rules to the CUDA executor's
ordering; small sizes, no timing targets. Output: gpu_check.json (with the device's name),
trace_pipeline.json and gpu_check.png under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import schedmoe
from schedmoe.ops.codecs import cuda_kernels
from schedmoe.ops.codecs.codec_set import make_codec
from schedmoe.ops.codecs.compressor import SliceSpec, Wire
from schedmoe.overlap import interleaved_step
from schedmoe.streams import lanes
from schedmoe.streams.checking import CheckingLanes
from schedmoe.tools.syncs import count_syncs

HERE = Path(__file__).resolve().parent
SCHEDULERS = ("sequential", "pipeline", "adaptive")
CODECS = ("none", "fp16", "bf16", "int8", "fp8") + (
    ("zstd",) if importlib.util.find_spec("zstandard") else ())  # none on the GPU machine
LOSSY = {"fp16", "bf16", "int8", "fp8"}
LAYOUTS = {"padded": {"capacity_factor": 1.25, "ragged": False},
           "ragged": {"capacity_factor": 1.25},
           "dropless": {"capacity_factor": 0.0}}


class Run:
    """Where the checks run: the device, the sizes, and how time is taken."""

    def __init__(self, dry_run: bool, out: Path) -> None:
        self.dry = dry_run
        self.out = out
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.name = "cpu (dry run)" if dry_run else torch.cuda.get_device_name()

    def lanes(self) -> contextlib.AbstractContextManager:
        """The lanes the layer's calls run on: CUDA streams on a GPU, a checker on a dry run
        (entered as its dispatch mode, so every op is checked)."""
        if not self.dry:
            return contextlib.nullcontext(None)
        checker = CheckingLanes()
        stack = contextlib.ExitStack()
        stack.enter_context(lanes.checking(checker))
        stack.enter_context(checker)
        stack.callback(checker.raise_errors)
        return stack

    def sync(self) -> None:
        if not self.dry:
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
        """Median milliseconds of `fn` (CUDA events on a GPU, the host clock on a dry run)."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            self.sync()
            if self.dry:
                start = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - start))
            else:
                begin, end = torch.cuda.Event(enable_timing=True), \
                    torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
        return statistics.median(times)


def _layer(scheduler: str, codec: str, layout: str, **extra) -> schedmoe.MoELayer:
    torch.manual_seed(0)
    return schedmoe.MoELayer(32, 4, 64, top_k=2, scheduler=scheduler, compressor=codec,
                             shared_hidden_dim=16, **LAYOUTS[layout], **extra)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# -- 1. CUDA == CPU ----------------------------------------------------------------------------

def check_agree(run: Run) -> dict:
    cases, worst = [], 0.0
    for layout in ("padded", "ragged"):
        for scheduler in SCHEDULERS:
            for codec in CODECS:
                here = _layer(scheduler, codec, layout)
                there = _layer(scheduler, codec, layout).to(run.device)
                x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
                errors = []
                for step in range(3):  # an adaptive layer profiles on its first calls
                    xs = [x.clone().requires_grad_(), x.to(run.device).clone().requires_grad_()]
                    ys = [here(xs[0])]
                    ys[0].square().sum().backward()
                    with run.lanes() if step == 2 else contextlib.nullcontext():
                        ys.append(there(xs[1]))  # CUDA streams, or the checking lanes
                        ys[1].square().sum().backward()
                    run.sync()
                    errors = [_rel(ys[1], ys[0]), _rel(xs[1].grad, xs[0].grad)] + [
                        _rel(b.grad, a.grad) for a, b in zip(here.parameters(), there.parameters())
                        if a.grad is not None]
                    here.zero_grad()
                    there.zero_grad()
                err = max(errors)
                bound = 1e-3 if codec in LOSSY else 1e-5
                cases.append({"layout": layout, "scheduler": scheduler, "codec": codec,
                              "max_rel_error": err, "bound": bound, "ok": err <= bound})
                worst = max(worst, err if codec not in LOSSY else 0.0)
    return {"ok": all(c["ok"] for c in cases), "cases": cases,
            "worst_lossless_rel_error": worst}


# -- 2. host syncs ----------------------------------------------------------------------------

def _syncs_of_step(run: Run, layer: schedmoe.MoELayer, x: torch.Tensor, strict: bool) -> int:
    """Host syncs of one forward + backward: set_sync_debug_mode on a GPU ("error" raises at
    the first when `strict`), the package's auditor on a dry run."""
    if run.dry:
        with count_syncs() as audit:
            layer(x).square().sum().backward()
        return audit.total
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("error" if strict else "warn")
        try:
            layer(x).square().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def check_syncs(run: Run) -> dict:
    cases = []
    for layout, expected in (("padded", 0), ("dropless", 1)):
        for scheduler in SCHEDULERS:
            for codec in CODECS:
                if codec == "zstd":
                    continue  # swaps its byte sizes: documented as one sync per exchange
                layer = _layer(scheduler, codec, layout).to(run.device)
                x = torch.randn(64, 32, device=run.device, requires_grad=True)
                for _ in range(4):
                    layer(x).square().sum().backward()
                run.sync()
                try:
                    found = _syncs_of_step(run, layer, x, strict=expected == 0)
                except RuntimeError as exc:  # "error" mode: the first sync raised
                    found, where = -1, str(exc).splitlines()[0]
                else:
                    where = ""
                cases.append({"layout": layout, "scheduler": scheduler, "codec": codec,
                              "syncs": found, "expected": expected, "ok": found == expected,
                              "raised": where})
    return {"ok": all(c["ok"] for c in cases), "cases": cases}


# -- 3. the stream sanitizer ------------------------------------------------------------------

def sanitized_steps(run: Run) -> None:
    """The steps the sanitizer watches (run in a subprocess with TORCH_CUDA_SANITIZER=1; on a
    dry run, on the checking lanes, which raise at the end of a call with a race)."""
    for scheduler in ("pipeline", "adaptive"):
        for a2a in ("nccl", "staged"):
            for layout in ("padded", "ragged"):
                layer = _layer(scheduler, "int8", layout, a2a=a2a).to(run.device)
                x = torch.randn(64, 32, device=run.device, requires_grad=True)
                for _ in range(3):
                    with run.lanes():
                        layer(x).square().sum().backward()
    layer = _layer("pipeline", "bf16", "ragged").to(run.device)
    batches = [torch.randn(64, 32, device=run.device) for _ in range(2)]
    with run.lanes():
        interleaved_step(lambda b: layer(b).square().sum(), batches)
    run.sync()
    print("sanitized steps: done")


def check_sanitizer(run: Run) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({} if run.dry else
                                                    {"TORCH_CUDA_SANITIZER": "1"}))
    cmd = [sys.executable, __file__, "--sanitized-steps"] + (["--dry-run"] if run.dry else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    said = (done.stdout + done.stderr)[-3000:]
    races = said.count("CSAN detected") + said.count("LaneRaceError")
    return {"ok": done.returncode == 0 and races == 0, "returncode": done.returncode,
            "races": races, "output_tail": said[-1500:]}


# -- 4. a profiled pipelined step --------------------------------------------------------------

def _busy_intervals(trace: dict) -> dict[str, list[tuple[float, float, str]]]:
    """Device kernels and copies of a Chrome trace, by stream: (start, end, name) in us."""
    streams: dict[str, list] = {}
    for event in trace.get("traceEvents", []):
        if event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in event:
            stream = str(event.get("args", {}).get("stream", event.get("tid")))
            streams.setdefault(stream, []).append(
                (float(event["ts"]), float(event["ts"]) + float(event["dur"]), event["name"]))
    return streams


def _overlap_us(streams: dict[str, list]) -> tuple[float, float]:
    """(time with any stream busy, time with two or more busy), in us."""
    edges = sorted([(s, 1) for v in streams.values() for s, _, _ in v] +
                   [(e, -1) for v in streams.values() for _, e, _ in v])
    busy = multi = 0.0
    depth, last = 0, None
    for at, step in edges:
        if last is not None:
            busy += (at - last) if depth >= 1 else 0.0
            multi += (at - last) if depth >= 2 else 0.0
        depth, last = depth + step, at
    return busy, multi


def _kind(name: str) -> str:
    lowered = name.lower()
    if "pack_rows" in lowered or "unpack_rows" in lowered:
        return "codec kernel"
    if "memcpy" in lowered or "copy" in lowered:
        return "copy"
    if "gemm" in lowered or "sm90" in lowered or "cutlass" in lowered or "matmul" in lowered:
        return "GEMM"
    return "other"


def check_trace(run: Run) -> dict:
    M, E, H, T = (32, 4, 64, 64) if run.dry else (2048, 8, 4096, 8192)
    dtype = torch.float32 if run.dry else torch.bfloat16

    def layer_of(scheduler) -> schedmoe.MoELayer:
        torch.manual_seed(0)
        return schedmoe.MoELayer(M, E, H, top_k=2, scheduler=scheduler, a2a="staged",
                                 compressor="int8", expert="swiglu", capacity_factor=1.25,
                                 ragged=False, shared_hidden_dim=H // 2
                                 ).to(run.device, dtype)

    x = torch.randn(T, M, device=run.device, dtype=dtype, requires_grad=True)
    layers = {"pipeline(r=4)": layer_of(schedmoe.schedulers.pipeline.PipelineScheduler(4)),
              "sequential": layer_of("sequential")}

    def step(layer):
        return lambda: layer(x).float().square().sum().backward()

    times = {name: run.time_ms(step(layer), 3 if run.dry else 10)
             for name, layer in layers.items()}
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [] if run.dry else [torch.profiler.ProfilerActivity.CUDA])
    path = run.out / "trace_pipeline.json"
    with torch.profiler.profile(activities=activities) as prof:
        step(layers["pipeline(r=4)"])()
        run.sync()
    prof.export_chrome_trace(str(path))
    streams = _busy_intervals(json.loads(path.read_text()))
    busy, multi = _overlap_us(streams)
    by_stream = {stream: sorted({_kind(name) for _, _, name in v}) for stream, v in
                 streams.items()}
    kinds = {kind for v in by_stream.values() for kind in v}
    return {"ok": run.dry or (multi > 0 and len(streams) >= 3),
            "step_ms": times, "pipelined_over_sequential": times["pipeline(r=4)"] /
            times["sequential"], "streams": by_stream, "kinds_seen": sorted(kinds),
            "busy_us": busy, "two_or_more_streams_us": multi,
            "overlap_fraction": multi / busy if busy else 0.0, "trace": path.name}


# -- 5. codec kernels --------------------------------------------------------------------------

def check_codecs(run: Run) -> dict:
    P, R, C = (4, 64, 128) if run.dry else (8, 4096, 4096)
    src = torch.randn(P * R * C, device=run.device)
    dst = torch.empty_like(src)
    copy_ms = run.time_ms(lambda: dst.copy_(src), 3 if run.dry else 20)
    copy_gbs = 2 * src.numel() * 4 / copy_ms / 1e6
    cases = []
    for name in ("int8", "fp8"):
        codec = make_codec(name)
        for dtype in (torch.float32, torch.bfloat16):
            x = src.view(P, R, C).to(dtype)
            spec = SliceSpec((R, C), dtype)
            wire = codec.compress(x)
            moved = x.numel() * x.element_size() + wire.data.numel()  # read + written
            pack = run.time_ms(lambda: codec.compress(x), 3 if run.dry else 20)
            unpack = run.time_ms(lambda: codec.decompress(Wire(wire.data, wire.sizes), spec),
                                 3 if run.dry else 20)
            for op, ms in (("pack", pack), ("unpack", unpack)):
                gbs = moved / ms / 1e6
                cases.append({"codec": name, "dtype": str(dtype).split(".")[-1], "op": op,
                              "ms": ms, "GB/s": gbs, "of_copy": gbs / copy_gbs,
                              "ok": run.dry or gbs >= 0.7 * copy_gbs})
    return {"ok": all(c["ok"] for c in cases), "copy_GB/s": copy_gbs,
            "cupy_kernels": cuda_kernels.available(), "cases": cases}


# -- 6. speed at Mixtral-like sizes --------------------------------------------------------------

class PlainMoE(torch.nn.Module):
    """The plain PyTorch MoE to beat: route, sort tokens by expert, one SwiGLU matmul chain per
    expert, weighted sum back (what a model's own MoE block does without a library)."""

    def __init__(self, layer: schedmoe.MoELayer) -> None:
        super().__init__()
        self.layer = layer  # its experts' weights

    def forward(self, x_TM: torch.Tensor, w_EM: torch.Tensor, top_k: int) -> torch.Tensor:
        experts = self.layer.experts
        probs_TE = torch.softmax(x_TM.float() @ w_EM.float().t(), dim=-1)
        weight_TK, expert_TK = probs_TE.topk(top_k, dim=-1)
        order = expert_TK.reshape(-1).argsort()
        token_N = order // top_k
        counts = torch.bincount(expert_TK.reshape(-1), minlength=w_EM.shape[0]).tolist()
        x_NM = x_TM[token_N]
        outs, at = [], 0
        for e, n in enumerate(counts):
            rows = x_NM[at:at + n]
            h = F.silu(rows @ experts.w1_EMH[e]) * (rows @ experts.w3_EMH[e])
            outs.append(h @ experts.w2_EHM[e])
            at += n
        y_NM = torch.cat(outs) * weight_TK.reshape(-1)[order].unsqueeze(-1).to(x_TM.dtype)
        return torch.zeros_like(x_TM).index_add_(0, token_N, y_NM)


def check_speed(run: Run) -> dict:
    M, H, E, K, T = (64, 128, 4, 2, 256) if run.dry else (4096, 14336, 8, 2, 8192)
    dtype = torch.float32 if run.dry else torch.bfloat16
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(M, E, H, top_k=K, expert="swiglu", capacity_factor=0.0
                              ).to(run.device, dtype)
    x = torch.randn(T, M, device=run.device, dtype=dtype, requires_grad=True)
    repeat = 3 if run.dry else 5
    layer_ms = run.time_ms(lambda: layer(x).float().square().sum().backward(), repeat)
    plain = PlainMoE(layer)
    w_EM = torch.randn(E, M, device=run.device, dtype=dtype)
    plain_ms = run.time_ms(lambda: plain(x, w_EM, K).float().square().sum().backward(), repeat)
    # torch.mm of the same shapes: each of the 3 projections over T*K rows, forward (1 GEMM)
    # and backward (2 GEMMs each), as 9 GEMMs of T*K x M x H.
    a = torch.randn(T * K, M, device=run.device, dtype=dtype)
    w = torch.randn(M, H, device=run.device, dtype=dtype)
    mm_ms = 9 * run.time_ms(lambda: torch.mm(a, w), repeat)
    useful = 9 * 2 * T * K * M * H  # FLOPs of the experts' GEMMs, forward + backward
    tflops = {"layer": useful / layer_ms / 1e9, "plain": useful / plain_ms / 1e9,
              "torch.mm": useful / mm_ms / 1e9}
    utilisation = tflops["layer"] / tflops["torch.mm"]
    return {"ok": run.dry or utilisation >= 0.6,
            "sizes": {"M": M, "H": H, "E": E, "top_k": K, "tokens": T,
                      "dtype": str(dtype).split(".")[-1]},
            "ms": {"layer": layer_ms, "plain": plain_ms, "torch.mm (same GEMMs)": mm_ms},
            "tokens_per_s": {"layer": T / layer_ms * 1e3, "plain": T / plain_ms * 1e3},
            "TFLOP/s": tflops, "utilisation_vs_mm": utilisation,
            "layer_over_plain": plain_ms / layer_ms}


CHECKS = {"agree": check_agree, "syncs": check_syncs, "sanitizer": check_sanitizer,
          "trace": check_trace, "codecs": check_codecs, "speed": check_speed}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    checks = result["checks"]
    trace = checks.get("trace", {})
    if "step_ms" in trace:
        axes[0].bar(list(trace["step_ms"]), list(trace["step_ms"].values()))
        axes[0].set_title("step ms (staged A2A, one rank)")
    codecs = checks.get("codecs", {})
    if "cases" in codecs:
        labels = [f"{c['codec']} {c['dtype']} {c['op']}" for c in codecs["cases"]]
        axes[1].barh(labels, [c["GB/s"] for c in codecs["cases"]])
        axes[1].axvline(codecs["copy_GB/s"], color="k", linestyle="--", label="D2D copy")
        axes[1].axvline(0.7 * codecs["copy_GB/s"], color="r", linestyle=":", label="70%")
        axes[1].legend()
        axes[1].set_title("codec GB/s")
    speed = checks.get("speed", {})
    if "TFLOP/s" in speed:
        axes[2].bar(list(speed["TFLOP/s"]), list(speed["TFLOP/s"].values()))
        axes[2].set_title("expert TFLOP/s, fwd + bwd")
    fig.suptitle(f"gpu_check on {result['device']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="run the same code paths on CPU tensors, small, untimed")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu")
    parser.add_argument("--only", nargs="*", choices=sorted(CHECKS), help="these checks only")
    parser.add_argument("--sanitized-steps", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU, or with --dry-run")
    run = Run(args.dry_run, args.out)
    if args.sanitized_steps:
        sanitized_steps(run)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": run.name, "dry_run": run.dry, "torch": torch.__version__,
              "cuda": torch.version.cuda, "cupy_kernels": cuda_kernels.available(),
              "checks": {}}
    path = args.out / "gpu_check.json"
    began = time.perf_counter()
    for name in args.only or CHECKS:
        start = time.perf_counter()
        try:
            found = CHECKS[name](run)
        except Exception as exc:  # recorded: the other checks still run
            found = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        found["seconds"] = round(time.perf_counter() - start, 1)
        result["checks"][name] = found
        print(f"{name}: {'ok' if found['ok'] else 'FAILED'} ({found['seconds']} s)",
              flush=True)
        path.write_text(json.dumps(result, indent=1, default=str))
    result["seconds"] = round(time.perf_counter() - began, 1)
    path.write_text(json.dumps(result, indent=1, default=str))
    plot(result, args.out / "gpu_check.png")
    return 0 if all(c["ok"] for c in result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
