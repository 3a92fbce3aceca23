"""The scheduler interface: what runs between encode and decode, in what order.

Legend: W ranks in the EP group, E local experts per rank, C capacity, M model dim, N rows; P the
payload in the call's layout: `[W, E, C, M]` padded, `[N, M]` ragged rows (plan/layout.py).

The layer routes and encodes the tokens into `x_P` (slice w is for the experts of rank w); a
scheduler exchanges it, runs the local experts and exchanges the results back, returning `y_P`
in the same layout. It never branches on the layout: it asks the context (`chunks`, `slice`,
`cat`, `splits`, `run_experts`), which asks the layout. Chunked
schedulers split C through the context (`chunks`, `slice`, `cat`) and overlap the pieces; all
must give the sequential schedule's result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ..a2a_algos.base import A2AAlgorithm
from ..control.agreement import Rider
from ..exchange.send import PendingSend, Splits, exchange, start_send
from ..plan.layout import PaddedLayout, RaggedLayout, chunk_bounds
from ..ops.codecs.codec_set import CodecSet
from ..ops.experts.forms import Expert
from ..control.recorder import StepRecorder
from ..streams.lanes import INLINE, Lanes


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
    lanes: Lanes = INLINE  # where the work runs: CUDA streams on GPUs (streams/lanes.py)
    quiet: bool = False  # an inference call: nothing timed, nothing tuned

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
        """Row counts of chunk `chunk`'s exchange (None when every slice is the same size):
        towards the experts (dispatch, combine's gradient) or back."""
        return self.layout.splits(*self._slots(chunk), towards_experts)

    def _slots(self, chunk: int | None) -> tuple[int, int]:
        """[lo, hi) of chunk `chunk`; the whole capacity for an unchunked exchange."""
        return (0, self.layout.capacity) if chunk is None else self.bounds[chunk]

    def run_shared(self) -> None:
        """Run the shared experts now, if any and not yet run (a scheduler calls this while
        its exchanges are in flight; otherwise the layer does after the combine)."""
        if self.shared is not None:
            self.shared.start(self.rec, self.lanes)

    def dispatch(self, x_P: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Tokens to the ranks owning their experts."""
        return exchange(x_P, self.a2a, self.codecs.stream("dispatch", chunk),
                        self.codecs.stream("dispatch_grad", chunk), self.rec, "dispatch", chunk,
                        self._ride(), self.splits(chunk, True), self.lanes)

    def start_dispatch(self, x_P: torch.Tensor, chunk: int | None = None) -> PendingSend:
        """`dispatch` without waiting (no autograd: for schedules with their own backward)."""
        return start_send(x_P, self.a2a, self.codecs.stream("dispatch", chunk), self.rec,
                          "dispatch", chunk, self._ride(), self.splits(chunk, True), self.lanes)

    def start_send(self, x_P: torch.Tensor, name: str, chunk: int,
                   towards_experts: bool) -> PendingSend:
        """Issue chunk `chunk`'s exchange `name` ("combine", "combine.bwd", "dispatch.bwd")
        without waiting; the codec stream of the same name (`.bwd`: the gradient's)."""
        stream = name.replace(".bwd", "_grad")
        return start_send(x_P, self.a2a, self.codecs.stream(stream, chunk), self.rec, name,
                          chunk, splits=self.splits(chunk, towards_experts), lanes=self.lanes)

    def _ride(self) -> Rider | None:
        return None if self.rider is None else self.rider.claim()

    def combine(self, y_P: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Expert outputs back to the ranks that own the tokens."""
        return exchange(y_P, self.a2a, self.codecs.stream("combine", chunk),
                        self.codecs.stream("combine_grad", chunk), self.rec, "combine", chunk,
                        splits=self.splits(chunk, False), lanes=self.lanes)

    def run_experts(self, recv_P: torch.Tensor, chunk: int | None = None,
                    time_backward: bool = True) -> torch.Tensor:
        """Local experts over every source rank's tokens; same layout in and out. Under
        autograd their backward is timed too (`experts.bwd`: from the output's gradient
        arriving to the input's leaving), unless the schedule times its own backward."""
        timed = (time_backward and recv_P.requires_grad and torch.is_grad_enabled()
                 and not torch.compiler.is_compiling())  # a compiled graph is timed whole
        if timed:
            began: list[float] = []
            recv_P = _Mark.apply(recv_P, lambda: self.rec.interval("experts.bwd", began[0],
                                                                    chunk))
        with self.rec("experts", chunk):
            y_P = self.layout.run_experts(self.experts, recv_P, *self._slots(chunk))
        if timed:
            y_P = _Mark.apply(y_P, lambda: began.append(self.rec.now()))
        return y_P


class _Mark(torch.autograd.Function):
    """The identity; `note()` runs when its gradient passes (times a region's backward)."""

    @staticmethod
    def forward(ctx, x, note):  # type: ignore[override]
        ctx.note = note
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        ctx.note()
        return grad, None


class SharedWork:
    """The shared experts of one call on this rank's tokens `x_TM`: started once, by the
    scheduler (while its exchanges are in flight) or the layer, whichever asks first (copies
    of a StepContext share it), on the `shared` lane (a side stream on GPUs), backward too."""

    def __init__(self, experts: torch.nn.Module, x_TM: torch.Tensor) -> None:
        self._experts, self._x = experts, x_TM
        self.out: torch.Tensor | None = None

    def start(self, rec: StepRecorder, lanes: Lanes) -> None:
        if self.out is not None:
            return
        params = [p for p in self._experts.parameters() if p.requires_grad]
        if not lanes.overlaps or not torch.is_grad_enabled() or not (
                self._x.requires_grad or params):
            with lanes.on("shared", self._x), rec("shared"):
                self.out = self._experts(self._x)
        else:
            self.out = _SharedRegion.apply(self._x, self._experts, rec, lanes, *params)

    def result(self, rec: StepRecorder, lanes: Lanes) -> torch.Tensor:
        """The shared experts' output, for the current lane."""
        self.start(rec, lanes)
        lanes.join("shared", self.out)
        return self.out


class _SharedRegion(torch.autograd.Function):
    """The shared experts on their lane as one autograd node whose backward runs on that lane
    too (as autograd would place it on CUDA, made explicit so that a checking backend sees
    it); parameter gradients go back to the engine."""

    @staticmethod
    def forward(ctx, x_TM, experts, rec, lanes, *params):  # type: ignore[override]
        with torch.enable_grad(), lanes.on("shared", x_TM), rec("shared"):
            x_in = x_TM.detach().requires_grad_(x_TM.requires_grad)
            y_TM = experts(x_in)
        ctx.lanes, ctx.params = lanes, params
        ctx.save_for_backward(x_in, y_TM)
        return y_TM.detach()

    @staticmethod
    def backward(ctx, grad_TM):  # type: ignore[override]
        x_in, y_TM = ctx.saved_tensors
        wanted = [x_in] if x_in.requires_grad else []
        with ctx.lanes.on("shared", grad_TM):
            found = torch.autograd.grad(y_TM, wanted + list(ctx.params), grad_TM,
                                        retain_graph=True, allow_unused=True)
        ctx.lanes.join("shared", *found)
        grad_x = found[0] if x_in.requires_grad else None
        return (grad_x, None, None, None) + tuple(found[len(wanted):])


class Scheduler(ABC):
    """Orders exchange and expert work. Subclasses take keyword options in their constructor.

    A scheduler that sends every call's first dispatch through `ctx.dispatch` or
    `ctx.start_dispatch` sets `carries_agreement = True`: the layer may then let the agreement
    record ride on that exchange instead of swapping it beforehand (agreement.py). Such a
    scheduler must expect a call to be abandoned by an exception from that dispatch (every rank
    alike) and possibly made again at another capacity.

    Under `torch.compile` a `traceable` scheduler is traced into the layer's graph (it must then
    keep its host-side state out of the trace); any other runs eagerly between the compiled
    parts of the layer.
    """

    carries_agreement = False
    follows_clock = False  # tunes by optimizer steps when a StepClock is attached (clock.py)
    traceable = True

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
    def run(self, x_P: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Return the combined expert outputs `y_P` for the encoded tokens `x_P`."""
