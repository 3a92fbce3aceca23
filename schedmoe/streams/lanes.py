"""Lanes: where one layer call's device work runs and what orders it (CUDA streams on GPUs).

A call's work runs on these lanes, relative to the caller's current stream (`stats` is one
per device):

| lane      | runs                                                 | on CUDA                   |
| --------- | ---------------------------------------------------- | ------------------------- |
| `compute` | routing, encode/decode, experts, their backward      | the caller's stream       |
| `codec`   | compress, issuing each exchange                      | a side stream             |
| `comm`    | nothing but each exchange's arrival (a stream wait)  | a side stream             |
| `decode`  | decompress, after the arrival                        | a side stream             |
| `shared`  | the shared experts                                   | a side stream             |
| `stats`   | updates of state every call shares (the expert load) | one stream a device       |

Work moves between lanes by two calls, the only ordering there is:
- `on(lane, *inputs, after=...)`: run the enclosed ops on `lane`, after everything queued so
  far on the lane `after` names (the current one by default); `inputs`, made elsewhere, are
  used there, so their memory is kept until that lane is done with them (`record_stream`).
- `join(lane, *outputs)`: the current lane waits for everything queued so far on `lane`;
  `outputs`, made there, are used here (kept likewise).
An exchange is issued inside `issuing()` (its reads go out after the issuing lane's work so
far) and `arrive(token)` orders the current lane (`comm`) after its arrival: on CUDA, NCCL
does both itself (its stream waits for the issuing stream; `work.wait()` makes the current
stream wait), so they only tell a checking backend (checking.py) what the wire did.

Compression and decompression have lanes of their own so that chunk i + 1's decompression
(which waits only for its arrival) is not queued behind chunk i's combine compression (which
waits for chunk i's experts): it runs during chunk i's experts.

The host never blocks on any of this. Side streams are kept per (device, caller stream), so
micro-batches on streams of their own (overlap/microbatches.py) get side lanes of their own.

On CPUs (and inside a compiled graph, which orders its own work) every lane is the caller's:
`on` and `join` do nothing, the ops run in program order (`INLINE`).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Protocol

import torch

LANES = ("compute", "codec", "comm", "decode", "shared", "stats")
GLOBAL = ("stats",)  # one lane for every call (micro-batches too): its updates stay in order


class Backend(Protocol):
    """What lanes are made of: CUDA streams (`CudaStreams`) or a checker's fake ones."""

    def current(self) -> object: ...  # the current lane (a stream)

    def side(self, base: object | None, name: str) -> object: ...  # `name` beside base

    def use(self, lane: object) -> contextlib.AbstractContextManager: ...

    def record(self, lane: object) -> object: ...  # an event after the lane's work so far

    def wait(self, lane: object, event: object) -> None: ...  # lane waits for the event

    def keep(self, t: torch.Tensor, lane: object) -> None: ...  # t is used on lane too

    def issuing(self) -> contextlib.AbstractContextManager: ...  # exchanges issued inside

    def arrive(self, token: object) -> None: ...  # the current lane follows their arrival

    def fork(self, base: object, index: int) -> object: ...  # a micro-batch's compute lane

    def use_base(self, lane: object) -> contextlib.AbstractContextManager: ...  # this thread's


class Lanes:
    """The lanes of one layer call, bound to the caller's current stream (`compute`)."""

    def __init__(self, backend: Backend | None) -> None:
        self.backend = backend
        self._lanes = {} if backend is None else {"compute": backend.current()}

    @property
    def overlaps(self) -> bool:
        """Whether work on different lanes may run at the same time (False on CPUs)."""
        return self.backend is not None and not torch.compiler.is_compiling()

    def lane(self, name: str) -> object:
        if name not in self._lanes:
            if name not in LANES:
                raise ValueError(f"no lane {name!r}; lanes are {LANES}")
            base = None if name in GLOBAL else self._lanes["compute"]
            self._lanes[name] = self.backend.side(base, name)
        return self._lanes[name]

    @contextlib.contextmanager
    def on(self, name: str, *inputs: torch.Tensor | None,
           after: str | None = "") -> Iterator[None]:
        """Run the enclosed ops on lane `name` after the work queued so far on lane `after`
        ("" the current lane, None no lane: the caller orders it some other way)."""
        if not self.overlaps:
            yield
            return
        b, target = self.backend, self.lane(name)
        source = b.current() if after == "" else None if after is None else self.lane(after)
        if source is not None and source != target:
            b.wait(target, b.record(source))
        for t in inputs:
            if t is not None:
                b.keep(t, target)
        with b.use(target):
            yield

    def join(self, name: str, *outputs: torch.Tensor | None) -> None:
        """The current lane waits for the work queued so far on lane `name`, whose `outputs`
        it uses."""
        if not self.overlaps:
            return
        b, here, source = self.backend, self.backend.current(), self.lane(name)
        if source != here:
            b.wait(here, b.record(source))
            for t in outputs:
                if t is not None:
                    b.keep(t, here)

    @contextlib.contextmanager
    def issuing(self) -> Iterator[object]:
        """Around issuing an exchange from the current lane; gives the token `arrive` takes."""
        if not self.overlaps:
            yield None
            return
        token: list = [None, None]
        with self.backend.issuing() as inner:
            yield token
        # after the issue's own work on this lane (a staged copy, say)
        token[:] = [self.backend.record(self.backend.current()), inner]

    def arrive(self, token: object) -> None:
        """The current lane is ordered after the issue of the exchange `token` (an algorithm
        whose wait issues more collectives reads what was issued) and after its arrival (on
        CUDA the exchange's own `wait()` does that)."""
        if self.overlaps:
            issued, inner = token
            self.backend.wait(self.backend.current(), issued)
            self.backend.arrive(inner)


class CudaStreams:
    """Lanes as CUDA streams: the caller's own, and side streams kept per (caller stream)."""

    def __init__(self) -> None:
        self._sides: dict[tuple[int, str], torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    def current(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream()

    def side(self, base: torch.cuda.Stream | None, name: str) -> torch.cuda.Stream:
        """Lane `name` beside `base`; with no base, the device's one lane of that name."""
        device = torch.device("cuda", torch.cuda.current_device()) if base is None \
            else base.device
        key = (device.index if base is None else base.cuda_stream, name)
        with self._lock:
            if key not in self._sides:
                self._sides[key] = torch.cuda.Stream(device)
            return self._sides[key]

    def use(self, lane: torch.cuda.Stream) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(lane)

    def record(self, lane: torch.cuda.Stream) -> torch.cuda.Event:
        return lane.record_event()

    def wait(self, lane: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        lane.wait_event(event)

    def keep(self, t: torch.Tensor, lane: torch.cuda.Stream) -> None:
        if t.is_cuda:
            t.record_stream(lane)

    def issuing(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # NCCL's stream waits for the issuing stream itself

    def arrive(self, token: object) -> None:
        pass  # the exchange's `work.wait()` made the current stream wait

    def fork(self, base: torch.cuda.Stream, index: int) -> torch.cuda.Stream:
        return self.side(base, f"micro-batch {index}")

    def use_base(self, lane: torch.cuda.Stream) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(lane)  # the current stream is per thread


_CUDA = CudaStreams()
_GLOBAL_OVERRIDE: list[Backend | None] = [None]  # set by `checking`


def lanes_for(device: torch.device) -> Lanes:
    """The lanes of a call on `device`: a checker's (`checking`), CUDA streams, or inline."""
    return Lanes(current_backend(device))


@contextlib.contextmanager
def checking(backend: Backend) -> Iterator[Backend]:
    """Every call made inside (on any thread) runs on `backend`'s lanes: tests run the CUDA
    executor's ordering on CPU tensors under a checker (checking.py)."""
    previous, _GLOBAL_OVERRIDE[0] = _GLOBAL_OVERRIDE[0], backend
    try:
        yield backend
    finally:
        _GLOBAL_OVERRIDE[0] = previous


def current_backend(device: torch.device) -> Backend | None:
    """The backend of calls on `device` now: a checker's, CUDA streams, or None (inline)."""
    if _GLOBAL_OVERRIDE[0] is not None:
        return _GLOBAL_OVERRIDE[0]
    if device.type == "cuda" and not torch.compiler.is_compiling():
        return _CUDA
    return None


def lane_key(device: torch.device) -> object:
    """The current lane's identity on `device` (a CUDA stream's handle, a checker's lane name,
    None inline): device constants cached per lane are read only by the lane that made them,
    so a cache never hands one lane a tensor another lane may still be copying in."""
    backend = current_backend(device)
    if backend is None:
        return None
    lane = backend.current()
    return getattr(lane, "cuda_stream", lane)


INLINE = Lanes(None)


class MicroBatchLanes:
    """A compute lane of its own for each micro-batch of an interleaved step (a stream each on
    CUDA), forked from the caller's, so that one micro-batch's exchanges are in flight while
    another's work runs, forward and backward. Backward passes accumulate into the same
    `.grad`s, so each starts after the previous one on its lane (`backward`); the caller's lane
    waits for them all at the end (`join`). Inline (nothing) on CPUs."""

    def __init__(self, count: int) -> None:
        backend = _GLOBAL_OVERRIDE[0]
        if backend is None and torch.cuda.is_available() and torch.cuda.is_initialized():
            backend = _CUDA
        self.backend = backend
        self._last: object = None  # the event after the latest backward
        if backend is not None:
            self._origin = backend.current()
            self._forked = backend.record(self._origin)
            self._lanes = [backend.fork(self._origin, i) for i in range(count)]

    @contextlib.contextmanager
    def run(self, index: int) -> Iterator[None]:
        """Micro-batch `index`'s thread runs on its lane inside."""
        if self.backend is None:
            yield
            return
        lane = self._lanes[index]
        self.backend.wait(lane, self._forked)
        with self.backend.use_base(lane):
            yield

    @contextlib.contextmanager
    def backward(self, index: int, loss: torch.Tensor) -> Iterator[None]:
        """Around micro-batch `index`'s backward of `loss`: after the previous one's on the
        device; the `.grad`s an earlier micro-batch made, which this one accumulates into,
        are handed over to its lane."""
        if self.backend is None:
            yield
            return
        lane = self._lanes[index]
        if self._last is not None:
            self.backend.wait(lane, self._last)
        for leaf in _leaves(loss):
            if leaf.grad is not None:
                self.backend.keep(leaf.grad, lane)
        try:
            yield
        finally:
            self._last = self.backend.record(lane)

    def join(self) -> None:
        """The caller's lane waits for every micro-batch's work (call on the caller's
        thread, after they ended)."""
        if self.backend is not None:
            for lane in self._lanes:
                self.backend.wait(self._origin, self.backend.record(lane))

    @property
    def overlaps(self) -> bool:
        return self.backend is not None


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors `t`'s backward accumulates into (its graph's AccumulateGrad nodes)."""
    found, seen, todo = [], set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            found.append(node.variable)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return found
