"""What one layer call did: wall-clock seconds per named op, bytes per exchange, and (when
tracing) every op's interval: (task, chunk, stream, start, end) in seconds since the recorder
was made."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, NamedTuple

import torch


class TraceEvent(NamedTuple):
    task: str
    chunk: int | None
    stream: str  # "compute" or "comm"
    start: float
    end: float


class StepRecorder:
    """Adds the seconds spent in each named op to `seconds[name]` (use as `with rec("op"):`),
    and the bytes of each exchange before and after compression to `bytes[name]`.

    On CUDA it synchronises around each op so the figure is the op's own time; schedulers that
    overlap ops should time whole phases instead.
    """

    def __init__(self, device: torch.device | None = None, trace: bool = False) -> None:
        self.seconds: dict[str, float] = {}
        self.bytes: dict[str, list[int]] = {}  # name -> [payload bytes, wire bytes]
        self.events: list[TraceEvent] | None = [] if trace else None
        self._sync = device is not None and device.type == "cuda"
        self._origin = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._origin

    @contextlib.contextmanager
    def __call__(self, name: str, chunk: int | None = None,
                 stream: str = "compute") -> Iterator[None]:
        if self._sync:
            torch.cuda.synchronize()
        start = self.now()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize()
            self.interval(name, start, chunk, stream)

    def interval(self, name: str, start: float, chunk: int | None = None,
                 stream: str = "compute") -> None:
        """Record that `name` ran from `start` (seconds since the origin) until now."""
        end = self.now()
        self.seconds[name] = self.seconds.get(name, 0.0) + end - start
        if self.events is not None:
            self.events.append(TraceEvent(name, chunk, stream, start, end))

    def count_bytes(self, name: str, payload: int, wire: int) -> None:
        totals = self.bytes.setdefault(name, [0, 0])
        totals[0] += payload
        totals[1] += wire

    def milliseconds(self) -> dict[str, float]:
        return {name: 1e3 * s for name, s in self.seconds.items()}
