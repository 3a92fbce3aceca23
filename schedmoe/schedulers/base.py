"""The scheduler interface: what runs between encode and decode, in what order.

Legend: W ranks in the EP group, E local experts per rank, C capacity, M model dim.

The layer routes and encodes the tokens into `x_WECM` (slice w is for the experts of rank w;
with `ragged`, unpadded `[N, M]` rows, see layout.py); a scheduler exchanges it, runs the local
experts and exchanges the results back, returning `y_WECM` in the same layout. Chunked
schedulers split C through the context (`chunks`, `slice`, `cat`) and overlap the pieces; all
must give the sequential schedule's result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..a2a_algos.base import A2AAlgorithm
from ..agreement import Rider
from ..exchange import PendingSend, Splits, exchange, start_send
from ..layout import PaddedLayout, RaggedLayout
from ..ops.codec_set import CodecSet
from ..ops.experts import Expert
from ..recorder import StepRecorder


@dataclass
class StepContext:
    """The ops a scheduler orchestrates for one layer call. `layout` says how the rows are laid
    out (layout.py): schedules chunk through `chunks`, `slice` and `cat`, never by indexing, so
    that the same schedule runs padded and ragged batches."""

    experts: Expert
    a2a: A2AAlgorithm
    codecs: CodecSet
    rec: StepRecorder
    layout: PaddedLayout | RaggedLayout
    notes: dict = field(default_factory=dict)  # what the scheduler decided, for last_stats
    recompute: bool = False  # an activation checkpoint's recompute: repeat the last decision
    rider: Rider | None = None  # the agreement record, carried by the call's first dispatch
    shared: "SharedWork | None" = None  # the shared experts' work on this rank's tokens
    bounds: dict = field(default_factory=dict)  # chunk -> its slots [lo, hi), see `chunks`

    def chunks(self, degree: int) -> list[tuple[int, int]]:
        """Split the capacity into `degree` chunks (fewer if C is smaller); chunk i is slots
        [lo, hi) of every segment. Later calls with `chunk=i` refer to these bounds."""
        bounds = chunk_bounds(self.layout.capacity, degree)
        self.bounds.clear()  # in place: copies of this context (adaptive) see them too
        self.bounds.update(enumerate(bounds))
        return bounds

    def slice(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """Chunk `chunk` of a tensor laid out like the layer's tokens (the send side)."""
        return self.layout.slice(x, *self.bounds[chunk])

    def cat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The send-side tensor from one part per chunk, in chunk order (inverse of `slice`)."""
        return self.layout.cat(parts, [self.bounds[i] for i in range(len(parts))])

    def splits(self, chunk: int | None, towards_experts: bool) -> Splits | None:
        """Ragged row counts of chunk `chunk`'s exchange (None when padded): towards the
        experts (dispatch, combine's gradient) or back (combine, dispatch's gradient)."""
        if not self.layout.ragged:
            return None
        lo, hi = self._slots(chunk)
        send, recv = self.layout.rows(lo, hi, "send"), self.layout.rows(lo, hi, "recv")
        return (send, recv) if towards_experts else (recv, send)

    def _slots(self, chunk: int | None) -> tuple[int, int]:
        """[lo, hi) of chunk `chunk`; the whole capacity for an unchunked exchange."""
        return (0, self.layout.capacity) if chunk is None else self.bounds[chunk]

    def run_shared(self) -> None:
        """Run the shared experts now, if any and not yet run (a scheduler calls this while
        its exchanges are in flight; otherwise the layer does after the combine)."""
        if self.shared is not None:
            self.shared.run(self.rec)

    def dispatch(self, x_WECM: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Tokens to the ranks owning their experts."""
        return exchange(x_WECM, self.a2a, self.codecs.stream("dispatch", chunk),
                        self.codecs.stream("dispatch_grad", chunk), self.rec, "dispatch", chunk,
                        self._ride(), self.splits(chunk, True))

    def start_dispatch(self, x_WECM: torch.Tensor, chunk: int | None = None) -> PendingSend:
        """`dispatch` without waiting (no autograd: for schedules with their own backward)."""
        return start_send(x_WECM, self.a2a, self.codecs.stream("dispatch", chunk), self.rec,
                          "dispatch", chunk, self._ride(), self.splits(chunk, True))

    def _ride(self) -> Rider | None:
        return None if self.rider is None else self.rider.claim()

    def combine(self, y_WECM: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Expert outputs back to the ranks that own the tokens."""
        return exchange(y_WECM, self.a2a, self.codecs.stream("combine", chunk),
                        self.codecs.stream("combine_grad", chunk), self.rec, "combine", chunk,
                        splits=self.splits(chunk, False))

    def run_experts(self, recv_WECM: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Local experts over every source rank's tokens; same layout in and out."""
        dtype = next(self.experts.parameters(), recv_WECM).dtype
        if self.layout.ragged:
            perm_R, counts = self.layout.expert_order(*self._slots(chunk))
            perm_R = perm_R.to(recv_WECM.device)
            with self.rec("experts", chunk):
                y_RM = self.experts.forward_ragged(recv_WECM.index_select(0, perm_R).to(dtype),
                                                   counts).to(recv_WECM.dtype)
                return torch.empty_like(y_RM).index_copy(0, perm_R, y_RM)
        world, experts, capacity, model_dim = recv_WECM.shape
        with self.rec("experts", chunk):
            x_EXM = recv_WECM.transpose(0, 1).reshape(experts, world * capacity, model_dim)
            y_EXM = self.experts(x_EXM.to(dtype)).to(recv_WECM.dtype)
            return y_EXM.view(experts, world, capacity, model_dim).transpose(0, 1).contiguous()


def chunk_bounds(capacity: int, degree: int) -> list[tuple[int, int]]:
    """[lo, hi) capacity slots of each chunk; at most `capacity` chunks (one if C == 0)."""
    parts = max(1, min(degree, capacity))
    base, extra = divmod(capacity, parts)
    bounds, lo = [], 0
    for i in range(parts):
        hi = lo + base + (1 if i < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


class SharedWork:
    """The shared experts of one call: run once, by the scheduler or the layer, whichever asks
    first (copies of a StepContext share it)."""

    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        self._fn = fn
        self.out: torch.Tensor | None = None

    def run(self, rec: StepRecorder) -> torch.Tensor:
        if self.out is None:
            with rec("shared"):
                self.out = self._fn()
        return self.out


class Scheduler(ABC):
    """Orders exchange and expert work. Subclasses take keyword options in their constructor.

    A scheduler that sends every call's first dispatch through `ctx.dispatch` or
    `ctx.start_dispatch` sets `carries_agreement = True`: the layer may then let the agreement
    record ride on that exchange instead of swapping it beforehand (agreement.py). Such a
    scheduler must expect a call to be abandoned by an exception from that dispatch (every rank
    alike) and possibly made again at another capacity.
    """

    carries_agreement = False

    def describe(self) -> str:
        """Name and settings; must be equal on every rank of the EP group."""
        return type(self).__name__

    def runtime_state(self) -> dict:
        """What this rank's scheduler learnt and decided while running (picklable), for exact
        resumes (checkpoints store it per rank); nothing for a fixed schedule."""
        return {}

    def load_runtime_state(self, state: dict) -> None:
        """Continue from `runtime_state()` of a scheduler built with the same options."""

    @abstractmethod
    def run(self, x_WECM: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Return the combined expert outputs `y_WECM` for the encoded tokens `x_WECM`."""
