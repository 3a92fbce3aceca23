"""A checking lane backend: the CUDA executor's ordering, run on CPU tensors and verified.

`CheckingLanes` stands in for `CudaStreams` (lanes.py): its lanes are names, its events vector
clocks. A `TorchDispatchMode` sees every op while it checks and files it under the calling
thread's current lane, the way the CUDA stream sanitizer (`TORCH_CUDA_SANITIZER=1`) files
kernels under streams, and applies the sanitizer's rule: an op may read a tensor only after the
last write to it, and write it only after the last write and every read since, where "after"
means on the same lane or ordered by an event the lane waited for. Collectives issued inside
`issuing()` run on lanes of their own, forked from the issuing lane, which the lane calling
`arrive(token)` then waits for (NCCL: its stream waits for the issuing stream; `work.wait()`
orders the waiting stream after it); collectives issued elsewhere (a blocking size exchange, a
hierarchical algorithm's second stage inside its wait) complete on their lane.

It also checks the lifetime rule: a tensor made on one lane and used on another must have been
handed over (`keep`, `record_stream` on CUDA), except by a collective (the process group keeps
what it uses). Tensors that existed before checking began are taken as made before every lane.

    checker = CheckingLanes()
    with lanes.checking(checker), checker:
        loss = layer(x).sum(); loss.backward()
    checker.raise_errors()
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..errors import SchedMoEError

BASE = "compute"


class LaneRaceError(SchedMoEError):
    """An access that a stream sanitizer would flag: unordered across lanes, or a tensor used
    on a lane it was not handed to."""


@dataclass
class _Storage:
    made_on: str | None  # None: existed before checking began
    write: tuple[str, int]  # (lane, its clock) of the last write
    reads: dict[str, int] = field(default_factory=dict)  # lane -> clock of its last read since
    kept: set[str] = field(default_factory=set)  # lanes it was handed to
    keepalive: object = None  # the storage itself: its address is not reused while checking


class CheckingLanes(TorchDispatchMode):
    """Fake lanes that check every op like the CUDA stream sanitizer (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.RLock()
        self._local = threading.local()
        self._clocks: dict[str, dict[str, int]] = {}
        self._storages: dict[int, _Storage] = {}
        self._exchanges = itertools.count()
        self.errors: list[str] = []
        self.ops: dict[str, int] = {}  # lane -> ops run there (tests check lanes were used)

    # -- the Backend protocol (lanes.py) -------------------------------------------------------

    def current(self) -> str:
        return getattr(self._local, "lane", None) or getattr(self._local, "base", BASE)

    def side(self, base: str | None, name: str) -> str:
        return name if base is None else f"{base}/{name}"

    @contextlib.contextmanager
    def use(self, lane: str) -> Iterator[None]:
        previous, self._local.lane = getattr(self._local, "lane", None), lane
        try:
            yield
        finally:
            self._local.lane = previous

    def record(self, lane: str) -> dict[str, int]:
        with self._lock:
            return dict(self._clock(lane))

    def wait(self, lane: str, event: dict[str, int]) -> None:
        with self._lock:
            clock = self._clock(lane)
            for other, tick in event.items():
                clock[other] = max(clock.get(other, 0), tick)

    def keep(self, t: torch.Tensor, lane: str) -> None:
        with self._lock:
            self._state(t, lane).kept.add(lane)

    @contextlib.contextmanager
    def issuing(self) -> Iterator[list[str]]:
        token: list[str] = []
        self._local.issuing = token
        try:
            yield token
        finally:
            self._local.issuing = None

    def arrive(self, token: list[str]) -> None:
        here = self.current()
        for lane in token:
            self.wait(here, self.record(lane))

    def fork(self, base: str, index: int) -> str:
        return f"{base}/micro-batch {index}"

    @contextlib.contextmanager
    def use_base(self, lane: str) -> Iterator[None]:
        """This thread (a micro-batch's) computes on `lane`, checked like the caller's."""
        previous = getattr(self._local, "base", BASE)
        self._local.base = lane
        try:
            with self:  # a dispatch mode holds for the thread that entered it
                yield
        finally:
            self._local.base = previous

    # -- checking ------------------------------------------------------------------------------

    def raise_errors(self) -> None:
        if self.errors:
            shown = "\n  ".join(self.errors[:10])
            raise LaneRaceError(f"{len(self.errors)} unordered or unkept accesses, e.g.:\n  "
                                f"{shown}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            return out  # a host read (HostCopy's CPU form): the host orders itself
        with self._lock:
            if func.namespace in ("c10d", "_c10d_functional"):
                self._collective(func, args, kwargs)
            elif _touches_data(func):
                self._op(func, args, kwargs, out)
        return out

    def _op(self, func, args, kwargs, out) -> None:
        lane = self.current()
        tick = self._tick(lane)
        written = set()
        for arg, value in zip(func._schema.arguments, list(args) + [None] * 99):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = kwargs.get(arg.name, value)
                written.update(id(t) for t in _tensors(value))
        for t in _tensors((args, kwargs)):
            if id(t) in written:
                self._write(t, lane, tick, func)
            else:
                self._read(t, lane, tick, func)
        for t in _tensors(out):  # a new tensor is made here; a view or `self` was seen above
            if t.untyped_storage().nbytes() and _key(t) not in self._storages:
                self._storages[_key(t)] = _Storage(lane, (lane, tick),
                                                   keepalive=t.untyped_storage())

    def _collective(self, func, args, kwargs) -> None:
        """On an exchange lane of its own inside `issuing()`, else on the current lane."""
        here = self.current()
        token = getattr(self._local, "issuing", None)
        lane = here
        if token is not None:
            lane = f"exchange{next(self._exchanges)}"
            self.wait(lane, self.record(here))
            token.append(lane)
        tick = self._tick(lane)
        for t in _tensors((args, kwargs)):
            self._state(t, lane).kept.add(lane)  # the process group keeps its tensors
            self._read(t, lane, tick, func)
            self._write(t, lane, tick, func)

    def _tick(self, lane: str) -> int:
        clock = self._clock(lane)
        clock[lane] = clock.get(lane, 0) + 1
        self.ops[lane] = self.ops.get(lane, 0) + 1
        return clock[lane]

    def _clock(self, lane: str) -> dict[str, int]:
        return self._clocks.setdefault(lane, {})

    def _state(self, t: torch.Tensor, lane: str) -> _Storage:
        key = _key(t)
        if key not in self._storages:  # existed before: made before every lane's work
            self._storages[key] = _Storage(None, (BASE, 0), keepalive=t.untyped_storage())
        return self._storages[key]

    def _ordered(self, lane: str, at: tuple[str, int]) -> bool:
        other, tick = at
        return other == lane or tick == 0 or self._clock(lane).get(other, 0) >= tick

    def _check_kept(self, s: _Storage, lane: str, func) -> None:
        if s.made_on is not None and s.made_on != lane and lane not in s.kept:
            self.errors.append(f"{func}: a tensor made on {s.made_on!r} is used on {lane!r} "
                               "without being handed over (record_stream)")
            s.kept.add(lane)  # once per tensor and lane

    def _read(self, t: torch.Tensor, lane: str, tick: int, func) -> None:
        if t.untyped_storage().nbytes() == 0:
            return
        s = self._state(t, lane)
        self._check_kept(s, lane, func)
        if not self._ordered(lane, s.write):
            self.errors.append(f"{func} on {lane!r} reads what {s.write[0]!r} wrote, "
                               "unordered")
        s.reads[lane] = tick

    def _write(self, t: torch.Tensor, lane: str, tick: int, func) -> None:
        if t.untyped_storage().nbytes() == 0:
            return
        s = self._state(t, lane)
        self._check_kept(s, lane, func)
        for other in [s.write, *s.reads.items()]:
            if not self._ordered(lane, other):
                self.errors.append(f"{func} on {lane!r} overwrites what {other[0]!r} used, "
                                   "unordered")
        s.write, s.reads = (lane, tick), {}


def _touches_data(func) -> bool:
    """False for ops that only read metadata: views (an aliasing result), `*_like`, `new_*`."""
    returns = func._schema.returns
    if returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write:
        return False
    name = func.__name__.split(".")[0]
    return not (name.endswith("_like") or name.startswith("new_"))


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]
