"""The schedule on two resources: a discrete-event model of one layer's pipelined region.

Two resources, as in ScheMoE's model: one compute stream runs compress, decompress and expert
tasks in the pipelined order (C1^1..C1^r | D1^i E^i C2^i per chunk | D2^1..D2^r); one
communication channel runs the A2As first in, first out, each starting when its input is
compressed and the channel is free. r = 1 is the sequential schedule. The backward pass has the
same shape with the exchanges swapped.

Interference: while both resources are busy, compute runs `1 / (1 + compute_slowdown)` as fast
and communication `1 / (1 + comm_slowdown)` (on CPUs the transport's copies take cores from the
experts; on GPUs the A2A's kernels take SMs and memory bandwidth). Tasks progress as fluids:
their rates change whenever the other resource starts or stops.

Task costs come from `CostModel`s (t = alpha + beta * n): fitted from measurements (the adaptive
scheduler), or derived from a cluster description (`model.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..control.recorder import TraceEvent

FORWARD = ("dispatch", "experts", "combine")
BACKWARD = ("combine.bwd", "experts.bwd", "dispatch.bwd")


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


@dataclass
class _Task:
    name: str
    chunk: int | None
    stream: str
    work: float  # seconds at full speed
    after: int | None  # index of the task on the other stream it waits for


def _pipelined_tasks(chunks: Sequence[dict[str, float]], stages: tuple[str, str, str],
                     shared: float) -> dict[str, list[_Task]]:
    """The pipelined order, stream by stream (tasks wait for their stream's previous task)."""
    first, expert, second = stages
    compute: list[_Task] = []
    comm: list[_Task] = []
    for i, c in enumerate(chunks):
        compute.append(_Task(f"{first}.compress", i, "compute", c[f"{first}.compress"], None))
        comm.append(_Task(f"{first}.a2a", i, "comm", c[f"{first}.a2a"], len(compute) - 1))
    if shared:
        compute.append(_Task("shared", None, "compute", shared, None))
    for i, c in enumerate(chunks):
        compute.append(_Task(f"{first}.decompress", i, "compute", c[f"{first}.decompress"], i))
        compute.append(_Task(expert, i, "compute", c[expert], None))
        compute.append(_Task(f"{second}.compress", i, "compute", c[f"{second}.compress"], None))
        comm.append(_Task(f"{second}.a2a", i, "comm", c[f"{second}.a2a"], len(compute) - 1))
    for i, c in enumerate(chunks):
        compute.append(_Task(f"{second}.decompress", i, "compute", c[f"{second}.decompress"],
                             len(chunks) + i))
    return {"compute": compute, "comm": comm}


def simulate(chunks: Sequence[dict[str, float]], stages: tuple[str, str, str] = FORWARD,
             start: float = 0.0, shared: float = 0.0, compute_slowdown: float = 0.0,
             comm_slowdown: float = 0.0) -> Timeline:
    """Timeline of the pipelined schedule; `chunks[i]` maps task names to seconds, with names
    `{first}.compress|a2a|decompress`, `{expert}`, `{second}.compress|a2a|decompress`.
    `shared`: seconds of shared-expert work, run on the compute stream once every first
    exchange is issued, while they are in flight (the pipelined schedule's forward order).
    `*_slowdown`: the interference factors above (0: none, the classic two-machine model)."""
    queues = _pipelined_tasks(chunks, stages, shared)
    other = {"compute": "comm", "comm": "compute"}
    slow = {"compute": compute_slowdown, "comm": comm_slowdown}
    head = {"compute": 0, "comm": 0}
    finished: dict[str, list[float]] = {"compute": [], "comm": []}
    running: dict[str, list] = {}  # stream -> [task, began, remaining work]
    clock = start
    events: list[TraceEvent] = []
    while True:
        for s in ("compute", "comm"):  # start every head task whose input is ready
            if s in running or head[s] == len(queues[s]):
                continue
            task = queues[s][head[s]]
            if task.after is not None and len(finished[other[s]]) <= task.after:
                continue
            running[s] = [task, clock, task.work]
            head[s] += 1
        if not running:
            break
        rate = {s: 1.0 / (1.0 + slow[s]) if len(running) == 2 else 1.0 for s in running}
        left = {s: running[s][2] / rate[s] for s in running}  # seconds to finish at this rate
        step = min(left.values())
        clock += step
        for s in list(running):
            task, began, remaining = running[s]
            if left[s] <= step * (1 + 1e-12):
                events.append(TraceEvent(task.name, task.chunk, s, began, clock))
                finished[s].append(clock)
                del running[s]
            else:
                running[s][2] = remaining - step * rate[s]
    end = max([start] + finished["compute"] + finished["comm"])
    return Timeline(events, end - start)
