"""What the ranks of an EP group must agree on before an exchange, and the one collective that
checks it.

Legend: W ranks in the EP group, F integers in one rank's step record.

Every call of an MoE layer swaps one small int64 record per rank (F values): the layer's
options as canonical strings (hashed; recomputed when an option changes), the input's dtype, device
type and autograd state, a local problem code, and the rank's capacity limit (the size exchange
that decides the buffer's capacity C). Every rank swaps its record exactly once per call,
whatever it finds locally, so a rank with a bad input or a local failure cannot leave the others
waiting in an exchange: the records tell every rank about every problem and they all raise the
same typed error. Only when something is wrong do the ranks swap a second, larger record (the
readable values), to say exactly what differs.

How the record travels:
- Synchronously (`Agreement.agree`, one all-gather before the exchange): in dropless mode, whose
  capacity depends on every rank's routing, with error feedback (its residuals must be dropped
  before compressing if a layout changed), on a layer's first calls and after a change.
- As a rider on the first dispatch exchange (`Rider`, no collective of its own), in fixed-
  capacity mode once two calls in a row agreed on the same capacity, dtype and input-grad state:
  every rank guesses that this call agrees alike, encodes for that guess and appends its record
  to every slice it sends. A rank whose own state contradicts the guess (bad input, a larger
  limit, another dtype) sends zeros of the guessed shape instead, so every payload has the size
  its receiver expects and nothing can deadlock. The records are checked when the first
  dispatch arrives, before anything is decoded: a problem raises the typed error on every rank;
  a wrong guess raises `Misguessed` carrying what was agreed, and the layer runs the call again
  with it (every rank sees the same records, so all take the same path). The all-gather costs
  5.6 ms per call (3.7% of the step) on 4 CPU ranks at T = 256, which is why the record rides
  instead (docs/hardening.md).

Options changed at run time (`layer.scheduler = ...`, `layer.config.capacity_factor = ...`) are
re-read by the layer at its next call and put in the record (`set_options`). Which collectives a
call makes before its records are compared (rider or all-gather, split sizes in the record or
not) depends only on what the previous call agreed, the same on every rank, never on this
rank's new options: a rank whose options changed while the others may still ride sends
placeholders through the exchange the last call agreed on (problem code RECONFIGURED). The
records then show either a mismatch (the typed error on every rank) or that every rank changed
alike (`Misguessed(resync=True)`: every rank agrees again, in an all-gather, and runs the call
with the new options).

The options arrive as canonical strings (options.py); the rider's wire format is rider.py.
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from ..comm.groups import EPGroup, all_gather_ints, collective
from ..errors import ConfigMismatchError, InputError, StepError
from ..ops.codecs import checks
from ..ops.codecs.compressor import CorruptPayloadError
from .rider import Rider

T = TypeVar("T")
# send(agreed, rider, running, timer): encode at `agreed` and run the exchanges, the first
# dispatch carrying `rider` if any, through `running` (scheduler, codecs, A2A) if not None.
Send = Callable[[Any, "Rider | None", "tuple | None", Any], T]


# What one rank found about its own input before the exchange (problem codes).
OK, NOT_TENSOR, BAD_SHAPE, BAD_DTYPE, NON_FINITE, EMPTY, BAD_DEVICE, FAILED = range(8)
RECONFIGURED = 8  # not a problem: this rank's options changed; it sent placeholders
PROBLEMS = {
    NOT_TENSOR: ("a non-tensor instead of a torch.Tensor (got {})",
                 "call the layer with a tensor shaped [..., model_dim]"),
    BAD_SHAPE: ("last dimension {}", "pass a tensor shaped [..., model_dim]"),
    BAD_DTYPE: ("a non-floating dtype", "pass float32, float16 or bfloat16 activations"),
    NON_FINITE: ("NaN or Inf values", "the input holds NaN/Inf (check_finite=True found it)"),
    EMPTY: ("no tokens", "pass at least one token, or build the layer with allow_empty=True"),
    BAD_DEVICE: ("device type {}, not the layer's",
                 "move the input to the layer's device (meta tensors hold no data)"),
}

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_DEVICE_TYPES = ["cpu", "cuda", "meta"]


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) + 1 if dtype in _DTYPES else zlib.crc32(str(dtype).encode())


def device_code(device_type: str) -> int:
    if device_type in _DEVICE_TYPES:
        return _DEVICE_TYPES.index(device_type) + 1
    return zlib.crc32(device_type.encode())


@dataclass
class LocalStep:
    """This rank's side of the agreement for one call."""

    problem: int = OK
    note: str = ""  # what the problem message shows (a type name, a dimension, a device type)
    dtype: str = "-"
    device_type: str = "-"
    graph: bool = False  # builds an autograd graph through the exchanges
    input_grad: bool = False  # the input itself needs a gradient
    limit: int = 0  # this rank's capacity limit
    layout: int = 0  # hash of the token -> slot layout (only when error feedback needs it)
    error: BaseException | None = None  # a local failure (problem FAILED)
    counts: list[int] | None = None  # ragged rows: rows this rank sends to each expert
    idle: bool = False  # a serving call: this rank has no work left, it keeps the others going
    quiet: bool = False  # an inference call (no aux losses, whose global form all-reduces)

    def record(self) -> list[int]:
        dtype = dtype_code(getattr(torch, self.dtype)) if self.dtype != "-" else 0
        device = device_code(self.device_type) if self.device_type != "-" else 0
        return [self.problem, dtype, device, int(self.graph), int(self.input_grad),
                self.limit, self.layout, int(self.idle), int(self.quiet)]


_COLUMNS = ("problem", "dtype", "device", "graph", "input_grad", "limit", "layout", "idle",
            "quiet")


def check_input(x: object, device: torch.device, model_dim: int, experts: torch.nn.Module,
                check_finite: bool, allow_empty: bool) -> LocalStep:
    """This rank's input problems and its autograd state (`device`: the layer's)."""
    if not isinstance(x, torch.Tensor):
        return LocalStep(NOT_TENSOR, note=type(x).__name__)
    local = LocalStep(dtype=str(x.dtype).removeprefix("torch."), device_type=x.device.type)
    inference = not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()
    local.graph = torch.is_grad_enabled() and not inference and (
        x.requires_grad or any(p.requires_grad for p in experts.parameters()))
    local.input_grad = local.graph and x.requires_grad
    if x.device.type != device.type or x.device.type == "meta":
        local.problem, local.note = BAD_DEVICE, repr(x.device.type)
    elif x.dim() == 0 or x.shape[-1] != model_dim:
        local.problem = BAD_SHAPE
        dim = x.shape[-1] if x.dim() else "none"
        local.note = f"{dim} instead of model_dim ({model_dim})"
    elif not x.is_floating_point():
        local.problem = BAD_DTYPE
    elif check_finite and not bool(torch.isfinite(x).all()):
        local.problem = NON_FINITE
    elif x.numel() == 0 and not allow_empty:
        local.problem = EMPTY
    return local


@dataclass
class Agreed:
    """What every rank learnt from the collective."""

    capacity: int  # C: the largest limit over the group
    input_grad: bool  # some rank's input needs a gradient
    layouts: tuple[int, ...]  # every rank's layout hash
    dtype: str = "-"  # the input dtype, the same on every rank
    counts_WE: np.ndarray | None = None  # ragged: rows each rank sends to each expert (host)
    all_idle: bool = False  # every rank made a serving call (hf/generate.py: all are done)

    def same_call(self, other: "Agreed | None") -> bool:
        """Whether a call agreeing `other` exchanges the same shapes as this one."""
        return other is not None and (self.capacity, self.dtype, self.input_grad) == (
            other.capacity, other.dtype, other.input_grad)


class Misguessed(Exception):
    """The guess a rider was sent under was wrong, without any error: run the call again with
    `agreed`, or, if `resync`, agree again first because every rank's options changed alike
    (internal to the layer; raised on every rank alike)."""

    def __init__(self, agreed: Agreed, resync: bool = False) -> None:
        super().__init__(f"the guessed capacity/dtype/input-grad state was wrong: {agreed}")
        self.agreed = agreed
        self.resync = resync


class Agreement:
    """The per-call agreement of one layer: `options` are name -> canonical string;
    `num_experts` is the length of a split-size record (ragged rows).

    `run` is a call's protocol: the state it keeps from call to call (the last call's agreement,
    the guess for the next one, what the last call ran through) is the same on every rank, so
    every rank takes the same path."""

    def __init__(self, group: EPGroup, options: dict[str, str], num_experts: int) -> None:
        self.group = group
        self.num_experts = num_experts
        self.set_options(options)
        self._agreed_crc: int | None = None  # the options hash of the last call that agreed
        # Whether the split sizes ride in the next all-gathered record: only if the last
        # all-gather had them (ragged rows), which every rank knows alike.
        self._counts_ride = False
        self.last: Agreed | None = None  # what the last call agreed
        self.guess: Agreed | None = None  # what the next call is guessed to agree, if it rides
        # The scheduler, codecs and A2A the last call ran, with shallow copies taken then: a
        # rank whose options changed since sends its placeholders through them (as_ran).
        self._ran: tuple[tuple, tuple] = ((), ())

    def run(self, local: LocalStep, send: Send[T],
            new_timer: Callable[[], Any], *, ride: bool, objects: tuple, moved: bool,
            may_ride: bool, observe: Callable[[Agreed], None] | None = None
            ) -> tuple[Agreed, T, Any]:
        """One call: agree and `send`; returns what was agreed, what `send` returned and the
        timer of the attempt that counted.

        Without a guess (or `ride` False) the records are all-gathered first. With one, they
        ride on the first dispatch of `send(guess, rider, ...)`; a rank whose options changed
        since the last call (`moved`) sends placeholders through what the last call ran, so
        its exchanges match the others'. A wrong guess runs the call again at the agreed
        shapes; options changed alike everywhere agree again first (`observe` sees every
        all-gathered agreement: error feedback drops residuals of another layout). The next
        call is guessed once two calls in a row agreed alike and `may_ride` (the options let
        records ride)."""
        timer = new_timer()
        guess = self.guess if ride else None
        if guess is None:
            agreed = self._agree(local, timer, observe)
            result = send(agreed, None, None, timer)
        else:
            running = None  # the live objects
            if moved:
                running = self._as_ran()
                if local.problem == OK:
                    local.problem = RECONFIGURED
            rider = self.rider(local, guess)
            try:
                result = send(guess, rider, running, timer)
                with timer("agree"):
                    agreed = rider.conclude()
            except Misguessed as miss:  # every rank alike: run the call at the agreed shapes
                timer = new_timer()
                if miss.resync:  # every rank's options changed alike: agree on the new ones
                    local.problem = OK
                    agreed = self._agree(local, timer, observe)
                else:
                    agreed = miss.agreed
                result = send(agreed, None, None, timer)
        # A capacity that changes every call is swapped beforehand, not guessed wrong each time.
        self.guess = agreed if agreed.same_call(self.last) and may_ride else None
        self.last = agreed
        self._ran = (objects, tuple(copy.copy(obj) for obj in objects))
        return agreed, result, timer

    def _agree(self, local: LocalStep, timer: Any,
               observe: Callable[[Agreed], None] | None) -> Agreed:
        with timer("agree"):
            agreed = self.agree(local, local.counts)
        if observe is not None:
            observe(agreed)
        return agreed

    def _as_ran(self) -> tuple:
        """What the last call ran through: the objects themselves (whose state is as the other
        ranks'), or the copies taken then of those changed in place since."""
        objects, copies = self._ran
        return tuple(obj if obj.describe() == then.describe() else then
                     for obj, then in zip(objects, copies))

    def set_options(self, options: dict[str, str]) -> None:
        """This rank's options from now on (the layer re-read them)."""
        self.options = dict(options)
        self._options_crc = zlib.crc32(repr(sorted(options.items())).encode()) & 0x7FFFFFFF

    @property
    def options_crc(self) -> int:
        """The hash of this rank's options, the first int of every record."""
        return self._options_crc

    @property
    def changed(self) -> bool:
        """This rank's options differ from those the last call agreed on."""
        return self._agreed_crc is not None and self._options_crc != self._agreed_crc

    def agree(self, local: LocalStep, counts: list[int] | None = None) -> Agreed:
        """Swap the records; raise the same typed error on every rank if anything is wrong.
        `counts` (ragged rows: rows for each expert) ride in the same record if the last
        all-gather had them too (records of one length on every rank: a rank without counts
        sends zeros); otherwise they follow in a second all-gather."""
        ride = self._counts_ride
        extra = (counts if counts is not None else [0] * self.num_experts) if ride else []
        record = [self._options_crc, *local.record(), *extra]
        rows = all_gather_ints(record, self.group, "the per-call agreement of MoELayer")
        width = 1 + len(_COLUMNS)
        agreed = self.conclude([row[:width] for row in rows], local)
        if counts is not None:
            counts_WE = [row[width:] for row in rows] if ride else all_gather_ints(
                counts, self.group, "the split-size exchange of MoELayer")
            agreed.counts_WE = np.asarray(counts_WE, dtype=np.int64)
        self._counts_ride = counts is not None  # the same on every rank: the options agree
        return agreed

    def rider(self, local: LocalStep, guess: Agreed) -> Rider:
        """This call's record, to ride on the first dispatch sent under `guess`."""
        return Rider([self._options_crc, *local.record()],
                     lambda rows: self.conclude(rows, local, guess))

    def conclude(self, rows: list[list[int]], local: LocalStep,
                 guess: Agreed | None = None) -> Agreed:
        """What every rank's record (`rows`, by rank) says; the same typed error on every rank
        if anything is wrong, Misguessed if the call was sent under a `guess` that turned out
        wrong."""
        col = {name: [row[1 + i] for row in rows] for i, name in enumerate(_COLUMNS)}
        problems = col["problem"]
        crcs = {row[0] for row in rows}
        if len(crcs) > 1 or any(code not in (OK, RECONFIGURED) for code in problems):
            self._raise(local, problems)
        self._agreed_crc = crcs.pop()
        shown = {"dtype": ("input dtype", local.dtype),
                 "device": ("input device type", local.device_type),
                 "graph": ("autograd state (graph built through the layer)", _graph_text(local)),
                 "quiet": ("call kind (inference: inference_mode, or no_grad in eval mode)",
                           "inference" if local.quiet else "training")}
        for name, (what, mine) in shown.items():
            if len(set(col[name])) > 1:
                values = self._swap(mine)
                raise InputError(
                    f"the {what} differs across the ranks of the EP group ("
                    + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                    + "); every rank must call the layer alike (same dtype and device type, "
                    "all in training with grad enabled or all under no_grad, all in train() or "
                    "all in eval() mode)")
        agreed = Agreed(max(col["limit"]), any(col["input_grad"]), tuple(col["layout"]),
                        local.dtype, all_idle=all(col["idle"]))
        if RECONFIGURED in problems:  # every rank changed its options alike
            raise Misguessed(agreed, resync=True)
        if guess is not None and not agreed.same_call(guess):
            raise Misguessed(agreed)
        return agreed

    # -- the error path: every rank takes it together ------------------------------------------

    def _raise(self, local: LocalStep, problems: list[int]) -> None:
        checks.discard()  # the error raised here, on every rank, supersedes any pending check
        reports = self._swap((self.options, _describe(local)))
        options_W = [opts for opts, _ in reports]
        differing = [name for name in self.options
                     if len({repr(opts.get(name)) for opts in options_W}) > 1]
        if "layer" in differing:
            raise ConfigMismatchError(
                "the ranks of the EP group called different MoE layers in one call (" + ", ".join(
                    f"rank {r}: {opts.get('layer')}" for r, opts in enumerate(options_W))
                + f"); this is {self.group.describe()}. Every rank must call the same layers in "
                "the same order (and build them in the same order)")
        if differing:
            lines = "; ".join(
                f"{name} differs across the ranks of the EP group (" + ", ".join(
                    f"rank {r}: {opts.get(name)}" for r, opts in enumerate(options_W)) + ")"
                for name in differing)
            raise ConfigMismatchError(
                f"{lines}; this is {self.group.describe()}. Build MoELayer with the same "
                "arguments on every rank, and change its options at run time (layer.scheduler, "
                "layer.codecs, layer.a2a, layer.config.*) on every rank between the same calls.")
        bad = [r for r, code in enumerate(problems) if code not in (OK, RECONFIGURED)]
        failed = [r for r in bad if problems[r] == FAILED]
        if failed:
            text = "; ".join(f"rank {r}: {reports[r][1]}" for r in failed)
            # A payload a rank found corrupt since its last call (ops/codecs/checks.py) is
            # raised as such everywhere; any other failure as a StepError.
            corrupt = all(reports[r][1].startswith(CorruptPayloadError.__name__ + ":")
                          for r in failed)
            kind = CorruptPayloadError if corrupt else StepError
            error = kind(f"the layer failed before its exchange on rank(s) {failed} ({text}); "
                         "every rank of the EP group stops")
            raise error from local.error
        r = bad[0]
        who = "this rank's" if r == self.group.rank else f"rank {r}'s"
        raise InputError(f"{who} input has {reports[r][1]}; every rank of the EP group stops "
                         f"(ranks with bad input: {bad}). Fix the input on those ranks.")

    def _swap(self, mine: Any) -> list[Any]:
        """Every rank's `mine` (pickled): only on the error path."""
        if not self.group.distributed:
            return [mine]
        out: list[Any] = [None] * self.group.size
        with collective("the error report of MoELayer's agreement", self.group):
            dist.all_gather_object(out, mine, group=self.group.pg)
        return out


def _describe(local: LocalStep) -> str:
    if local.problem in (OK, RECONFIGURED):
        return "no problem"
    if local.problem == FAILED:
        return f"{type(local.error).__name__}: {local.error}"
    text, hint = PROBLEMS[local.problem]
    return f"{text.format(local.note)}: {hint}"


def _graph_text(local: LocalStep) -> str:
    return "builds a graph" if local.graph else "no graph (no_grad, inference or frozen experts)"
