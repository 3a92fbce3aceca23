"""What one layer call did: wall-clock seconds per named op, bytes per exchange, and (when
tracing) every op's interval: (task, chunk, stream, start, end) in seconds since the recorder
was made."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, NamedTuple, Union

import torch

Mark = Union[float, "torch.cuda.Event"]  # a moment: host seconds, or a CUDA event


class TraceEvent(NamedTuple):
    task: str
    chunk: int | None
    stream: str  # "compute" or "comm"
    start: float
    end: float


class StepRecorder:
    """Adds the seconds spent in each named op to `seconds[name]` (use as `with rec("op"):`),
    and the bytes of each exchange before and after compression to `bytes[name]`.

    Never synchronises the device: on CPU the marks are the host clock; on CUDA they are
    events recorded on the current stream, turned into seconds (waiting for those events
    alone) only when `seconds` or `events` is read: by the adaptive scheduler while tuning,
    by a trace, or by whoever reads `last_stats`. An op's CUDA time runs from its first kernel
    queued to its last one done, so ops that overlap on several streams add up to more than
    the step; schedulers that overlap ops should time whole phases instead.
    """

    def __init__(self, device: torch.device | None = None, trace: bool = False,
                 timing: bool = True) -> None:
        """`timing=False`: no marks at all (inference calls, which nothing tunes from)."""
        self.timing = timing or trace
        self.bytes: dict[str, list[int]] = {}  # name -> [payload bytes, wire bytes]
        self._seconds: dict[str, float] = {}
        self._events: list[TraceEvent] | None = [] if trace else None
        self._cuda = device is not None and device.type == "cuda"
        self._marks: list[tuple] = []  # (name, chunk, stream, start mark, end mark), unread
        self._origin = self.now()

    def now(self) -> Mark:
        """A mark of this moment: the host clock, or an event queued on the current stream
        (none inside a compiled graph: its ops are timed as a whole, by whoever calls it)."""
        if torch.compiler.is_compiling() or not self.timing:
            return 0.0
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str, chunk: int | None = None,
                 stream: str = "compute") -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.interval(name, start, chunk, stream)

    def interval(self, name: str, start: Mark, chunk: int | None = None,
                 stream: str = "compute") -> None:
        """Record that `name` ran from the mark `start` (`now()`) until now."""
        if self.timing and not torch.compiler.is_compiling():
            self._marks.append((name, chunk, stream, start, self.now()))

    @property
    def seconds(self) -> dict[str, float]:
        self._read()
        return self._seconds

    @property
    def events(self) -> list[TraceEvent] | None:
        """Every op's interval, if tracing (None otherwise); assign a list to start tracing."""
        self._read()
        return self._events

    @events.setter
    def events(self, value: list[TraceEvent] | None) -> None:
        self._read()
        self._events = value

    def _read(self) -> None:
        """Turn the marks taken since the last read into seconds (and trace events)."""
        for name, chunk, stream, start, end in self._marks:
            start_s, end_s = self._since_origin(start), self._since_origin(end)
            self._seconds[name] = self._seconds.get(name, 0.0) + end_s - start_s
            if self._events is not None:
                self._events.append(TraceEvent(name, chunk, stream, start_s, end_s))
        self._marks.clear()

    def _since_origin(self, mark: Mark) -> float:
        if isinstance(mark, float):
            return mark - self._origin
        mark.synchronize()  # this event alone, and only when the times are read
        return self._origin.elapsed_time(mark) / 1e3

    def count_bytes(self, name: str, payload: int, wire: int) -> None:
        if torch.compiler.is_compiling():
            return  # no host state changes inside a compiled graph
        totals = self.bytes.setdefault(name, [0, 0])
        totals[0] += payload
        totals[1] += wire

    def milliseconds(self) -> dict[str, float]:
        return {name: 1e3 * s for name, s in self.seconds.items()}
