"""A discrete-event simulator of one MoE layer's exchange-expert-exchange schedule, cost models,
and a search over (A2A algorithm, codec, pipeline degree r).

Two resources, as in ScheMoE's model: one compute stream runs compress, decompress and expert
tasks in the pipelined order (C1^1..C1^r | D1^i E^i C2^i per chunk | D2^1..D2^r); one
communication channel runs the A2As first in, first out, each starting when its input is
compressed and the channel is free. r = 1 is the sequential schedule. The backward pass has the
same shape with the exchanges swapped and the expert costing twice its forward.

Task costs come from `CostModel`s (t = alpha + beta * n): fitted from measurements (the adaptive
scheduler), or derived from a `Cluster` description (`schedmoe simulate`), so one can ask what a
32- or 2,048-GPU cluster would do without owning one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from .recorder import TraceEvent

FORWARD = ("dispatch", "experts", "combine")
BACKWARD = ("combine.bwd", "experts.bwd", "dispatch.bwd")
ALGORITHMS = ("nccl", "2dh", "pipe")
CODECS = ("none", "fp16", "bf16", "int8", "fp8", "zstd")


@dataclass(frozen=True)
class CostModel:
    """t = alpha + beta * n seconds for a task of size n (bytes or rows)."""

    alpha: float = 0.0
    beta: float = 0.0

    def __call__(self, n: float) -> float:
        return self.alpha + self.beta * n

    @classmethod
    def fit(cls, sizes: Sequence[float], seconds: Sequence[float]) -> "CostModel":
        """Least squares with alpha, beta >= 0."""
        n = len(sizes)
        if n == 0:
            raise ValueError("no samples to fit a cost model to")
        mean_x, mean_t = sum(sizes) / n, sum(seconds) / n
        var = sum((x - mean_x) ** 2 for x in sizes)
        beta = sum((x - mean_x) * (t - mean_t) for x, t in zip(sizes, seconds)) / var if var else 0
        beta = max(beta, 0.0)
        alpha = mean_t - beta * mean_x
        if alpha < 0:
            alpha = 0.0
            sxx = sum(x * x for x in sizes)
            beta = sum(x * t for x, t in zip(sizes, seconds)) / sxx if sxx else 0.0
        return cls(alpha, beta)

    def r2(self, sizes: Sequence[float], seconds: Sequence[float]) -> float:
        mean_t = sum(seconds) / len(seconds)
        total = sum((t - mean_t) ** 2 for t in seconds)
        resid = sum((t - self(x)) ** 2 for x, t in zip(sizes, seconds))
        return 1.0 - resid / total if total else 1.0


@dataclass
class Timeline:
    events: list[TraceEvent]
    makespan: float

    def busy(self, stream: str) -> float:
        return sum(e.end - e.start for e in self.events if e.stream == stream)

    @property
    def overlap_efficiency(self) -> float:
        """max(compute busy, comm busy) / makespan: 1.0 means the longer resource never waits."""
        return max(self.busy("compute"), self.busy("comm")) / self.makespan if self.makespan else 1


def simulate(chunks: Sequence[dict[str, float]], stages: tuple[str, str, str] = FORWARD,
             start: float = 0.0, shared: float = 0.0) -> Timeline:
    """Timeline of the pipelined schedule; `chunks[i]` maps task names to seconds, with names
    `{first}.compress|a2a|decompress`, `{expert}`, `{second}.compress|a2a|decompress`.
    `shared`: seconds of shared-expert work, run on the compute stream once every first
    exchange is issued, while they are in flight (the pipelined schedule's forward order)."""
    first, expert, second = stages
    events: list[TraceEvent] = []
    compute, comm = start, start

    def run(task: str, i: int, stream: str, ready: float, clock: float) -> float:
        begin = max(ready, clock)
        end = begin + chunks[i][task]
        events.append(TraceEvent(task, i, stream, begin, end))
        return end

    first_done, second_done = [], []
    for i in range(len(chunks)):
        compute = run(f"{first}.compress", i, "compute", compute, compute)
        comm = run(f"{first}.a2a", i, "comm", compute, comm)
        first_done.append(comm)
    if shared:
        events.append(TraceEvent("shared", None, "compute", compute, compute + shared))
        compute += shared
    for i in range(len(chunks)):
        compute = run(f"{first}.decompress", i, "compute", first_done[i], compute)
        compute = run(expert, i, "compute", compute, compute)
        compute = run(f"{second}.compress", i, "compute", compute, compute)
        comm = run(f"{second}.a2a", i, "comm", compute, comm)
        second_done.append(comm)
    for i in range(len(chunks)):
        compute = run(f"{second}.decompress", i, "compute", second_done[i], compute)
    return Timeline(events, compute - start)


@dataclass
class Cluster:
    """Hardware parameters for what-if simulation (defaults: H100 nodes, 8 x 400 Gbit/s NICs)."""

    nodes: int = 4
    ranks_per_node: int = 8
    intra_gbit: float = 2400.0  # per rank, NVLink-class
    inter_gbit: float = 400.0  # per rank (one NIC per GPU)
    intra_latency_us: float = 5.0
    inter_latency_us: float = 10.0
    gemm_tflops: float = 400.0  # achieved, bf16
    memory_gbyte_s: float = 2500.0  # device copies (2dh layout transforms)
    codec_gbyte_s: float = 1000.0  # cast/quantise kernels, payload bytes per second
    zstd_gbyte_s: float = 1.0  # CPU zstd
    zstd_ratio: float = 1.15
    task_overhead_us: float = 10.0  # launch + bookkeeping per task

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node


@dataclass
class Workload:
    tokens: int = 4096  # per rank
    model_dim: int = 4096
    hidden_dim: int = 14336
    num_experts: int = 64
    top_k: int = 2
    capacity_factor: float = 1.25
    dtype_bytes: int = 2

    def capacity(self) -> int:
        return math.ceil(self.capacity_factor * self.top_k * self.tokens / self.num_experts)


def a2a_seconds(cluster: Cluster, algorithm: str, nbytes: float) -> float:
    """Time of one exchange of `nbytes` per rank (ScheMoE's models: flat sends its L intra and
    P-L inter messages one after another; pipe runs the two sets at once; 2dh sends L-1 intra
    and N-1 inter messages, larger, plus two layout copies)."""
    L, N, P = cluster.ranks_per_node, cluster.nodes, cluster.world
    intra_bw, inter_bw = cluster.intra_gbit * 1e9 / 8, cluster.inter_gbit * 1e9 / 8
    lat_i, lat_e = cluster.intra_latency_us * 1e-6, cluster.inter_latency_us * 1e-6
    message = nbytes / P
    t_intra = L * (lat_i + message / intra_bw)
    t_inter = (P - L) * (lat_e + message / inter_bw)
    if algorithm == "nccl":
        return t_intra + t_inter
    if algorithm == "pipe":
        return max(t_intra, t_inter)
    if algorithm == "2dh":
        copies = 2 * nbytes / (cluster.memory_gbyte_s * 1e9)
        return (L - 1) * (lat_i + message * N / intra_bw) + \
            (N - 1) * (lat_e + message * L / inter_bw) + copies
    raise ValueError(f"no cost model for A2A algorithm {algorithm!r}; known: {ALGORITHMS}")


def codec_effect(cluster: Cluster, codec: str, workload: Workload) -> tuple[float, float]:
    """(wire bytes per payload byte, seconds per payload byte to compress or decompress)."""
    b, M = workload.dtype_bytes, workload.model_dim
    if codec == "none":
        return 1.0, 0.0
    per_byte = 1.0 / (cluster.codec_gbyte_s * 1e9)
    if codec in ("fp16", "bf16"):
        return 2.0 / b, per_byte
    if codec in ("int8", "fp8"):
        return (M + 4) / (M * b), per_byte
    if codec == "zstd":
        return 1.0 / cluster.zstd_ratio, 1.0 / (cluster.zstd_gbyte_s * 1e9)
    raise ValueError(f"no cost model for codec {codec!r}; known: {CODECS}")


def chunk_costs(workload: Workload, cluster: Cluster, algorithm: str, codec: str,
                degree: int, backward: bool = False) -> list[dict[str, float]]:
    """Seconds of every task of every chunk, from the cluster's parameters."""
    from .schedulers.base import chunk_bounds

    local_experts = workload.num_experts // cluster.world
    ratio, codec_s = codec_effect(cluster, codec, workload)
    overhead = cluster.task_overhead_us * 1e-6
    first, expert, second = BACKWARD if backward else FORWARD
    chunks = []
    for lo, hi in chunk_bounds(workload.capacity(), degree):
        rows = cluster.world * local_experts * (hi - lo)
        nbytes = rows * workload.model_dim * workload.dtype_bytes
        flops = 4 * rows * workload.model_dim * workload.hidden_dim * (2 if backward else 1)
        coding = overhead + nbytes * codec_s if codec != "none" else 0.0
        exchange = overhead + a2a_seconds(cluster, algorithm, nbytes * ratio)
        chunks.append({
            f"{first}.compress": coding, f"{first}.a2a": exchange,
            f"{first}.decompress": coding,
            expert: overhead + flops / (cluster.gemm_tflops * 1e12),
            f"{second}.compress": coding, f"{second}.a2a": exchange,
            f"{second}.decompress": coding,
        })
    return chunks


@dataclass(order=True)
class Prediction:
    seconds: float  # forward + backward
    algorithm: str = field(compare=False)
    codec: str = field(compare=False)
    degree: int = field(compare=False)
    forward: Timeline = field(compare=False, repr=False)
    backward: Timeline = field(compare=False, repr=False)


def predict(workload: Workload, cluster: Cluster, algorithm: str, codec: str,
            degree: int) -> Prediction:
    fwd = simulate(chunk_costs(workload, cluster, algorithm, codec, degree), FORWARD)
    bwd = simulate(chunk_costs(workload, cluster, algorithm, codec, degree, backward=True),
                   BACKWARD, start=fwd.makespan)
    return Prediction(fwd.makespan + bwd.makespan, algorithm, codec, degree, fwd, bwd)


def search(workload: Workload, cluster: Cluster, algorithms: Sequence[str] = ALGORITHMS,
           codecs: Sequence[str] = ("none",), degrees: Sequence[int] = range(1, 17)
           ) -> list[Prediction]:
    """Every candidate's prediction, best first."""
    if workload.num_experts % cluster.world:
        raise ValueError(f"{workload.num_experts} experts do not divide over {cluster.world} "
                         "ranks")
    return sorted(predict(workload, cluster, a, c, r)
                  for a in algorithms for c in codecs for r in degrees)
