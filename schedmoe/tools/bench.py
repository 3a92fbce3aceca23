"""`schedmoe bench`: time forward + backward steps of one MoE layer on every rank.

Runs under torchrun (one process per rank, already launched), or spawns local ranks itself:
one per GPU with NCCL when CUDA GPUs are present, else 4 CPU ranks with gloo.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..comm.groups import serves_cuda
from ..errors import ConfigError
from ..layer import MoEConfig, MoELayer
from ..ops.codecs.codec_set import CodecSet
from ..control.recorder import TraceEvent
from ..registry import registry
from ..schedulers.pipeline import PipelineScheduler
from ..control.validation import number, one_of
from .launch import planned_world, run_ranks_here
from .trace import save_chrome_trace, save_gantt


@dataclass
class BenchConfig:
    """One benchmark run: the layer, the workload and how many steps to time."""

    tokens: int = 1024  # per rank
    model_dim: int = 512
    hidden_dim: int = 1024
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float = 1.25
    expert: str = "ffn"
    a2a: str = "nccl"
    compressor: str = "none"
    scheduler: str = "sequential"
    degree: int = 2  # chunks, for --scheduler pipeline
    dtype: str = "float32"
    steps: int = 10
    warmup: int = 2
    seed: int = 0
    layer_options: dict[str, Any] = field(default_factory=dict)

    def validate(self, world: int) -> None:
        """Every field, and the layer it describes on `world` ranks (ConfigError or
        RegistryError naming the problem), before any rank is started."""
        where = "BenchConfig"
        for name in ("tokens", "model_dim", "hidden_dim", "num_experts", "top_k", "degree",
                     "steps"):
            number(where, name, getattr(self, name), integer=True, low=1, high=1 << 24)
        number(where, "warmup", self.warmup, integer=True, high=1 << 24)
        number(where, "seed", self.seed, integer=True, high=2 ** 63 - 1)
        one_of(where, "dtype", self.dtype, ("float32", "float16", "bfloat16"))
        if self.tokens * max(self.model_dim, self.hidden_dim) * 4 > MAX_BYTES_PER_RANK:
            raise ConfigError(f"{where}: tokens x max(model_dim, hidden_dim) x 4 bytes exceeds "
                              f"{MAX_BYTES_PER_RANK >> 30} GiB per rank")
        for kind in ("expert", "a2a", "scheduler"):
            registry(kind).get(getattr(self, kind))
        CodecSet.build(self.compressor)
        MoEConfig(self.model_dim, self.num_experts, self.hidden_dim, self.top_k,
                  self.capacity_factor, expert=self.expert, a2a=self.a2a,
                  compressor=self.compressor, **self.layer_options).validate(world)


MAX_BYTES_PER_RANK = 8 << 30  # the largest activation one bench rank may be asked to hold


def run_rank(rank: int, world: int, cfg: BenchConfig, progress: bool = True) -> dict:
    """Time `cfg.steps` steps on this rank; returns per-step records."""
    device = torch.device("cuda", torch.cuda.current_device()) if _on_gpu() else torch.device("cpu")
    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(cfg.seed)  # the same gate on every rank, as data parallelism would keep it
    scheduler = PipelineScheduler(cfg.degree) if cfg.scheduler == "pipeline" else cfg.scheduler
    layer = MoELayer(cfg.model_dim, cfg.num_experts, cfg.hidden_dim, cfg.top_k,
                     cfg.capacity_factor, expert=cfg.expert, a2a=cfg.a2a,
                     compressor=cfg.compressor, scheduler=scheduler,
                     **cfg.layer_options).to(device)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed * 1009 + rank)
    x = torch.randn(cfg.tokens, cfg.model_dim, generator=g).to(device, dtype).requires_grad_()
    steps = []
    total = cfg.warmup + cfg.steps
    for i in range(total):
        t0 = time.perf_counter()
        y = layer(x)
        _sync(device)
        t1 = time.perf_counter()
        (y.float().square().mean() + 0.01 * y.l_aux).backward()
        _sync(device)
        t2 = time.perf_counter()
        stats = layer.last_stats
        if i >= cfg.warmup:
            steps.append({"forward_ms": 1e3 * (t1 - t0), "backward_ms": 1e3 * (t2 - t1),
                          "step_ms": 1e3 * (t2 - t0), "op_ms": stats.op_ms,
                          "dropped": stats.dropped, "processed": stats.processed,
                          "wire_bytes": stats.wire_bytes,
                          "capacity": stats.capacity})
        if progress and rank == 0:
            _progress(i + 1, total, 1e3 * (t2 - t0))
    if progress and rank == 0:
        print(file=sys.stderr)
    return {"rank": rank, "device": str(device), "steps": steps,
            "trace": [tuple(e) for e in layer.last_stats.events]}


def _on_gpu() -> bool:
    return dist.is_initialized() and serves_cuda(dist.group.WORLD)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress(done: int, total: int, step_ms: float) -> None:
    width = 30
    filled = width * done // total
    bar = "#" * filled + "." * (width - filled)
    print(f"\r  [{bar}] step {done}/{total}  {step_ms:8.1f} ms", end="", file=sys.stderr,
          flush=True)


def summarize(cfg: BenchConfig, per_rank: list[dict], backend: str) -> dict:
    """Medians over steps, then mean (ops) or max (step) over ranks."""
    world = len(per_rank)
    ops = list(dict.fromkeys(op for r in per_rank for s in r["steps"] for op in s["op_ms"]))

    def median(rank_result: dict, key: str, op: str | None = None) -> float:
        values = [(s["op_ms"].get(op, 0.0) if op else s[key]) for s in rank_result["steps"]]
        return statistics.median(values)

    op_ms = {op: statistics.mean(median(r, "", op) for r in per_rank) for op in ops}
    step_ms = max(median(r, "step_ms") for r in per_rank)
    dropped = sum(median(r, "dropped") for r in per_rank)
    pairs = world * cfg.tokens * cfg.top_k
    return {
        "config": asdict(cfg), "world_size": world, "backend": backend,
        "device": per_rank[0]["device"],
        "device_name": (torch.cuda.get_device_name() if backend == "nccl" else "cpu"),
        "forward_ms": max(median(r, "forward_ms") for r in per_rank),
        "backward_ms": max(median(r, "backward_ms") for r in per_rank),
        "step_ms": step_ms,
        "tokens_per_s": world * cfg.tokens / (step_ms / 1e3),
        "dropped_pairs": dropped, "dropped_fraction": dropped / pairs,
        "capacity": per_rank[0]["steps"][-1]["capacity"],
        "op_ms": op_ms, "wire_bytes": per_rank[0]["steps"][-1]["wire_bytes"],
        "per_rank": per_rank,
    }


def format_table(summary: dict) -> str:
    cfg = summary["config"]
    emulated = summary.get("emulated")
    where = (f", emulated {emulated['nodes']} nodes x {emulated['ranks_per_node']} ranks at "
             f"{emulated['rate']}" if emulated else "")
    lines = [
        f"schedmoe bench: {summary['world_size']} ranks ({summary['backend']}, "
        f"{summary['device_name']}), {cfg['tokens']} tokens/rank, model_dim {cfg['model_dim']}, "
        f"hidden {cfg['hidden_dim']}, {cfg['num_experts']} experts, top-{cfg['top_k']}, "
        f"capacity_factor {cfg['capacity_factor']} (C={summary['capacity']}), "
        f"a2a={cfg['a2a']}, compressor={cfg['compressor']}, scheduler={cfg['scheduler']}, "
        f"{cfg['dtype']}{where}",
        "",
        f"{'op':<28}{'median ms':>12}{'share':>9}",
        "-" * 49,
    ]
    total = sum(summary["op_ms"].values()) or 1.0
    for op, ms in summary["op_ms"].items():
        lines.append(f"{op:<28}{ms:>12.2f}{100 * ms / total:>8.1f}%")
    lines += [
        "-" * 49,
        f"{'forward (slowest rank)':<28}{summary['forward_ms']:>12.2f}",
        f"{'backward (slowest rank)':<28}{summary['backward_ms']:>12.2f}",
        f"{'step (slowest rank)':<28}{summary['step_ms']:>12.2f}",
        "",
        f"throughput: {summary['tokens_per_s']:,.0f} tokens/s over all ranks",
        "wire bytes per step, rank 0 (payload -> on the wire): " + ", ".join(
            f"{name} {raw / 2**20:.2f} -> {sent / 2**20:.2f} MiB ({raw / max(sent, 1):.2f}x)"
            for name, (raw, sent) in summary["wire_bytes"].items()),
        f"dropped: {summary['dropped_pairs']:.0f} of "
        f"{summary['world_size'] * cfg['tokens'] * cfg['top_k']} (token, expert) pairs per step "
        f"({100 * summary['dropped_fraction']:.2f}%)",
        "share: of the listed ops' total (which overlap under the pipeline scheduler); ops "
        "ending in .bwd run inside backward.",
    ]
    return "\n".join(lines)


def run(cfg: BenchConfig, ranks: int | None = None, timeout: float = 600.0) -> dict:
    """Run under torchrun if launched by it, else spawn local ranks; returns the summary."""

    cfg.validate(planned_world(ranks))
    per_rank = run_ranks_here(run_rank, (cfg,), ranks, timeout=timeout,
                              collective_timeout=120.0 if "RANK" not in os.environ else timeout)
    return summarize(cfg, per_rank, "nccl" if torch.cuda.is_available() else "gloo")


def save_trace(summary: dict, prefix: str) -> None:
    """Rank 0's last step as PREFIX.json (Chrome trace) and PREFIX.png (Gantt chart)."""

    events = [TraceEvent(*e) for e in summary["per_rank"][0]["trace"]]
    cfg = summary["config"]
    label = f"measured, rank 0: {cfg['scheduler']}"
    if cfg["scheduler"] == "pipeline":
        label += f" r={cfg['degree']}"
    save_chrome_trace({label: events}, prefix + ".json")
    save_gantt({label: events}, prefix + ".png", f"schedmoe bench, a2a={cfg['a2a']}, "
               f"compressor={cfg['compressor']}")


def save_json(summary: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
