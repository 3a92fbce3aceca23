"""One MoE layer's step on a described cluster: task costs, prediction, the candidate search.

A step is forward + backward of one layer: routing and the dispatch scatter / combine gather
outside the region (memory-bound work plus the gate's GEMM), and the pipelined region of each
pass (timeline.py) with its tasks costed from the cluster (cluster.py) and codec (codecs.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import ConfigError
from ..plan.layout import chunk_bounds
from ..plan.placement import plan_placement, static_placement
from ..control.validation import number
from .cluster import ALGORITHMS, Cluster, a2a_seconds, issue_seconds
from .timeline import BACKWARD, FORWARD, Timeline, simulate

CODECS = ("none", "fp16", "bf16", "int8", "fp8", "zstd", "zfp")


MAX_DEGREE = 64  # pipeline degrees the simulator is asked about, at most


@dataclass
class Workload:
    tokens: int = 4096  # per rank
    model_dim: int = 4096
    hidden_dim: int = 14336
    num_experts: int = 64
    top_k: int = 2
    capacity_factor: float = 1.25  # <= 0: dropless
    dtype_bytes: int = 2
    ragged: bool = False  # exchange only the routed rows, not the padded [E, C, M] buffer
    shared_hidden_dim: int = 0  # shared experts' total hidden size; 0: none
    # Skewed routing: each expert's share of the pairs (any scale, one per expert; empty:
    # balanced), e.g. `parallel.expert_load(model)[name].tokens` of a run, and where the
    # experts go: "static" (E / W consecutive experts a rank) or "planned" (plan/placement.py
    # with `redundant` replica slots a rank). The slowest rank sets the step.
    expert_load: tuple[float, ...] = ()
    placement: str = "static"
    redundant: int = 0

    def validate(self) -> None:
        for name in ("tokens", "model_dim", "hidden_dim", "num_experts", "top_k"):
            number("workload", name, getattr(self, name), integer=True, low=1, high=1 << 31)
        number("workload", "shared_hidden_dim", self.shared_hidden_dim, integer=True,
               high=1 << 31)
        if self.dtype_bytes not in (1, 2, 4, 8) or isinstance(self.dtype_bytes, bool):
            raise ConfigError(f"workload: dtype_bytes must be 1, 2, 4 or 8, got "
                              f"{self.dtype_bytes!r}")
        number("workload", "capacity_factor", self.capacity_factor, low=-1e6, high=1e6)
        if self.top_k > self.num_experts:
            raise ConfigError(f"workload: top_k ({self.top_k}) exceeds num_experts "
                              f"({self.num_experts})")
        if not isinstance(self.ragged, bool):
            raise ConfigError(f"workload: ragged must be true or false, got {self.ragged!r}")
        if self.expert_load and (len(self.expert_load) != self.num_experts or any(
                not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
                for v in self.expert_load)):
            raise ConfigError(f"workload: expert_load must be {self.num_experts} finite, "
                              f"non-negative numbers, one per expert; got "
                              f"{len(self.expert_load)}")
        if self.placement not in ("static", "planned"):
            raise ConfigError(f"workload: placement must be static or planned, got "
                              f"{self.placement!r}")
        number("workload", "redundant", self.redundant, integer=True,
               high=self.num_experts)  # more replica slots than experts buy nothing
        if self.redundant and self.placement != "planned":
            raise ConfigError("workload: redundant slots need placement='planned'")

    def skew(self, ranks: int, node_size: int | None = None) -> float:
        """max / mean pairs per rank under the workload's load and placement (1.0 balanced):
        the slowest rank receives and computes that many times the mean. A padded layout
        at a capacity drops the excess instead: no skew in its rows."""
        if not self.expert_load or (self.capacity_factor > 0 and not self.ragged):
            return 1.0
        return _skew(tuple(float(v) for v in self.expert_load), ranks, self.placement,
                     self.redundant, node_size)

    def capacity(self) -> int:
        return math.ceil(self.capacity_factor * self.top_k * self.tokens / self.num_experts)

    def rows(self) -> float:
        """Rows one rank sends per exchange (= rows its experts receive, routing balanced)."""
        return sum(_chunk_rows(self, 1))


@dataclass(order=True)
class Prediction:
    seconds: float  # forward + backward
    algorithm: str = field(compare=False)
    codec: str = field(compare=False)
    degree: int = field(compare=False)
    forward: Timeline = field(compare=False, repr=False)
    backward: Timeline = field(compare=False, repr=False)
    outside: float = field(compare=False, default=0.0)  # routing, scatter, gather


@functools.lru_cache(maxsize=64)
def _skew(load: tuple[float, ...], ranks: int, placement: str, redundant: int,
          node_size: int | None) -> float:
    """`Workload.skew`, planned once per question (a search asks for every candidate)."""
    load_E = np.asarray(load)
    if placement == "planned":
        placed = plan_placement(load_E, ranks, redundant, node_size=node_size,
                                seconds_per_move=0.0).placement
    else:
        placed = static_placement(load_E.size, ranks)
    return 1.0 / placed.balancedness(load_E)


def _chunk_rows(w: Workload, degree: int) -> list[float]:
    """Rows one rank sends in each chunk, as the schedulers cut them (`chunk_bounds`): padded,
    every slot of every expert in the chunk's slot range; ragged, only the routed rows (k T / E
    per expert, routing balanced), the same share of them in each chunk (plan/layout.py)."""

    routed = w.top_k * w.tokens / w.num_experts  # rows per expert and source rank
    if w.capacity_factor <= 0:  # dropless: the capacity is what arrives
        capacity, fill = math.ceil(routed), routed
    else:
        capacity = w.capacity()
        fill = min(capacity, routed) if w.ragged else capacity
    return [w.num_experts * fill * (hi - lo) / max(capacity, 1)
            for lo, hi in chunk_bounds(capacity, degree)]


def chunk_costs(workload: Workload, cluster: Cluster, algorithm: str, codec: str,
                degree: int, backward: bool = False) -> list[dict[str, float]]:
    """Seconds of every task of every chunk, from the cluster's parameters."""
    w, c = workload, cluster
    codec_model = c.codec(codec)
    wire = codec_model.wire_fraction(w.dtype_bytes, w.model_dim)
    overhead = c.task_overhead_us * 1e-6
    first, expert, second = BACKWARD if backward else FORWARD
    chunks, skew = [], w.skew(c.world, c.ranks_per_node)
    for chunk_rows in (rows * skew for rows in _chunk_rows(w, degree)):
        nbytes = chunk_rows * w.model_dim * w.dtype_bytes
        coding = 0.0 if codec == "none" else overhead + codec_model.seconds(nbytes)
        # issuing an exchange is compute-side work: it joins the compress task before it
        issue = issue_seconds(c, algorithm, nbytes * wire)
        exchange = overhead + a2a_seconds(c, algorithm, nbytes * wire)
        flops = 4 * chunk_rows * w.model_dim * w.hidden_dim
        # rows per local expert decide a GEMM's efficiency (half rate at gemm_half_rows)
        expert_rows = max(chunk_rows * c.world / w.num_experts, 1e-9)
        gemm = flops / (c.gemm_tflops * 1e12) * (1 + c.gemm_half_rows / expert_rows)
        chunks.append({
            f"{first}.compress": coding + issue, f"{first}.a2a": exchange,
            f"{first}.decompress": coding,
            expert: overhead + gemm * (c.backward_factor if backward else 1.0),
            f"{second}.compress": coding + issue, f"{second}.a2a": exchange,
            f"{second}.decompress": coding,
        })
    return chunks


def outside_seconds(workload: Workload, cluster: Cluster) -> float:
    """Forward + backward of what lies outside the region: the gate's GEMM and the dispatch
    scatter / combine gather (a read and a write of every routed row each way)."""
    w, c = workload, cluster
    gate = 2 * w.tokens * w.model_dim * w.num_experts / (c.gemm_tflops * 1e12)
    moves = 4 * w.rows() * w.model_dim * w.dtype_bytes / (c.memory_gbyte_s * 1e9)
    forward = 2 * c.task_overhead_us * 1e-6 + gate + moves
    return forward * (1 + c.backward_factor)


def shared_seconds(workload: Workload, cluster: Cluster, backward: bool) -> float:
    w, c = workload, cluster
    if not w.shared_hidden_dim:
        return 0.0
    flops = 4 * w.tokens * w.model_dim * w.shared_hidden_dim
    return flops / (cluster.gemm_tflops * 1e12) * (c.backward_factor if backward else 1.0)


def predict(workload: Workload, cluster: Cluster, algorithm: str, codec: str,
            degree: int) -> Prediction:
    slow = {"compute_slowdown": cluster.compute_slowdown,
            "comm_slowdown": cluster.comm_slowdown}
    fwd = simulate(chunk_costs(workload, cluster, algorithm, codec, degree), FORWARD,
                   shared=shared_seconds(workload, cluster, False), **slow)
    bwd = simulate(chunk_costs(workload, cluster, algorithm, codec, degree, backward=True),
                   BACKWARD, start=fwd.makespan, shared=shared_seconds(workload, cluster, True),
                   **slow)
    outside = outside_seconds(workload, cluster)
    return Prediction(fwd.makespan + bwd.makespan + outside, algorithm, codec, degree, fwd, bwd,
                      outside)


def search(workload: Workload, cluster: Cluster, algorithms: Sequence[str] = ALGORITHMS,
           codecs: Sequence[str] = ("none",), degrees: Sequence[int] = range(1, 17)
           ) -> list[Prediction]:
    """Every candidate's prediction, best first."""
    if workload.num_experts % cluster.world:
        raise ConfigError(f"{workload.num_experts} experts do not divide over {cluster.world} "
                          "ranks; choose num_experts as a multiple of nodes x ranks_per_node")
    return sorted(predict(workload, cluster, a, c, r)
                  for a in algorithms for c in codecs for r in degrees)
