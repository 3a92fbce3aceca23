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

Canonical options: an option is compared by what it means, not how it was spelled: registry
names and classes map to one name, `"pipeline"` and `PipelineScheduler(2)` both describe as
`pipeline(degree=2)`, floats print as floats. Callables
are compared by module, name, bytecode, defaults and closure values, so two different lambdas
differ and the same function defined on every rank agrees; a callable with no stable identity
(its repr shows a memory address) is refused with ConfigError.
"""

from __future__ import annotations

import enum
import types
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from .distributed import EPGroup, all_gather_ints, collective
from .errors import ConfigError, ConfigMismatchError, InputError, StepError
from .ops.compressor import CorruptPayloadError, Wire


def canonical(spec: Any, kind: str | None = None) -> str:
    """A string that is equal on two ranks iff `spec` means the same there."""
    from .registry import registry  # the registry imports plugin base classes lazily

    if spec is None or isinstance(spec, (str, bool, int)):
        return repr(spec)
    if isinstance(spec, float):
        return repr(float(spec))
    if isinstance(spec, dict):
        return "{" + ", ".join(f"{k!r}: {canonical(v)}" for k, v in sorted(spec.items())) + "}"
    if isinstance(spec, type):
        if kind is not None:
            name = registry(kind).name_of(spec)
            if name is not None:
                return repr(name)
        return f"{spec.__module__}.{spec.__qualname__}"
    describe = getattr(spec, "describe", None)
    if callable(describe):
        return describe()
    if callable(spec):
        return _callable_identity(spec)
    raise ConfigError(f"cannot compare option {spec!r} across ranks: pass a name, a class or "
                      "an object with describe()")


def _callable_identity(fn: Callable) -> str:
    code = getattr(fn, "__code__", None)
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    if isinstance(code, types.CodeType):
        parts = [_code_identity(code), repr(getattr(fn, "__defaults__", None))]
        for cell in getattr(fn, "__closure__", None) or ():
            parts.append(_value_identity(cell.cell_contents))
        return f"{name}#{zlib.crc32('|'.join(parts).encode()):08x}"
    if isinstance(fn, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        return name
    text = repr(fn)
    if " at 0x" in text:
        raise ConfigError(
            f"the callable {text} has no identity that can be compared across ranks: pass a "
            "registered name, a module-level function, or an object whose repr shows its "
            "settings")
    return f"{type(fn).__module__}.{type(fn).__qualname__}:{text}"


def _code_identity(code: types.CodeType) -> str:
    consts = [_code_identity(c) if isinstance(c, types.CodeType) else repr(c)
              for c in code.co_consts]
    return f"{code.co_code.hex()}:{consts}:{code.co_names}"


def _value_identity(value: Any) -> str:
    if value is None or isinstance(value, (bool, int, float, str, enum.Enum)):
        return repr(value)
    if callable(value):
        return _callable_identity(value)
    return type(value).__qualname__


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

    def record(self) -> list[int]:
        dtype = dtype_code(getattr(torch, self.dtype)) if self.dtype != "-" else 0
        device = device_code(self.device_type) if self.device_type != "-" else 0
        return [self.problem, dtype, device, int(self.graph), int(self.input_grad),
                self.limit, self.layout]


_COLUMNS = ("problem", "dtype", "device", "graph", "input_grad", "limit", "layout")


@dataclass
class Agreed:
    """What every rank learnt from the collective."""

    capacity: int  # C: the largest limit over the group
    input_grad: bool  # some rank's input needs a gradient
    layouts: tuple[int, ...]  # every rank's layout hash
    dtype: str = "-"  # the input dtype, the same on every rank
    counts_WE: torch.Tensor | None = None  # ragged: rows each rank sends to each expert

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


class Rider:
    """One call's record riding on the first dispatch exchange: appended to every slice sent,
    split off every slice received and checked before anything is decoded."""

    def __init__(self, record: list[int], conclude: Callable[[torch.Tensor], Agreed]) -> None:
        self._record_F = torch.tensor(record, dtype=torch.int64)
        self._conclude = conclude
        self.claimed = False
        self.agreed: Agreed | None = None  # set once the records have arrived and agree

    def claim(self) -> "Rider | None":
        """Self for the first exchange that asks (the first dispatch), None afterwards."""
        if self.claimed:
            return None
        self.claimed = True
        return self

    def attach(self, wire: Wire) -> Wire:
        """The wire with this rank's record after every slice."""
        record_R = self._record_F.view(torch.uint8).to(wire.data.device)
        pieces = []
        for slice_B in torch.split(wire.data, wire.sizes):
            pieces += [slice_B, record_R]
        return Wire(torch.cat(pieces), [size + record_R.numel() for size in wire.sizes])

    def detach(self, data: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Split the records off the slices received, conclude the agreement from them (raises
        the typed error or Misguessed), and return the bare payload and its slice sizes."""
        record_bytes = self._record_F.numel() * 8
        if any(size < record_bytes for size in sizes) or sum(sizes) != data.numel():
            raise CorruptPayloadError(f"the first dispatch carries a {record_bytes}-byte record "
                                      f"per slice, got slices of {list(sizes)[:8]} bytes")
        bodies, records = [], []
        for slice_B in torch.split(data, sizes):
            bodies.append(slice_B[:-record_bytes])
            records.append(slice_B[-record_bytes:])
        # A host sync on GPUs, which the algorithm needs: nothing is decoded before the check.
        records_WF = torch.stack(records).cpu().view(torch.int64)
        self.agreed = self._conclude(records_WF)
        return torch.cat(bodies), [size - record_bytes for size in sizes]


class Agreement:
    """The per-call agreement of one layer: `options` are name -> canonical string;
    `num_experts` is the length of a split-size record (ragged rows)."""

    def __init__(self, group: EPGroup, options: dict[str, str], num_experts: int) -> None:
        self.group = group
        self.num_experts = num_experts
        self.set_options(options)
        self._agreed_crc: int | None = None  # the options hash of the last call that agreed
        # Whether the split sizes ride in the next all-gathered record: only if the last
        # all-gather had them (ragged rows), which every rank knows alike.
        self._counts_ride = False

    def set_options(self, options: dict[str, str]) -> None:
        """This rank's options from now on (the layer re-read them)."""
        self.options = dict(options)
        self._options_crc = zlib.crc32(repr(sorted(options.items())).encode()) & 0x7FFFFFFF

    @property
    def changed(self) -> bool:
        """This rank's options differ from those the last call agreed on."""
        return self._agreed_crc is not None and self._options_crc != self._agreed_crc

    def agree(self, local: LocalStep, device: torch.device,
              counts: list[int] | None = None) -> Agreed:
        """Swap the records; raise the same typed error on every rank if anything is wrong.
        `counts` (ragged rows: rows for each expert) ride in the same record if the last
        all-gather had them too (records of one length on every rank: a rank without counts
        sends zeros); otherwise they follow in a second all-gather."""
        ride = self._counts_ride
        extra = (counts if counts is not None else [0] * self.num_experts) if ride else []
        record = [self._options_crc, *local.record(), *extra]
        record_WF = all_gather_ints(record, self.group, device,
                                    "the per-call agreement of MoELayer")
        agreed = self.conclude(record_WF[:, :1 + len(_COLUMNS)], local)
        if counts is not None:
            agreed.counts_WE = record_WF[:, 1 + len(_COLUMNS):] if ride else all_gather_ints(
                counts, self.group, device, "the split-size exchange of MoELayer")
        self._counts_ride = counts is not None  # the same on every rank: the options agree
        return agreed

    def rider(self, local: LocalStep, guess: Agreed) -> Rider:
        """This call's record, to ride on the first dispatch sent under `guess`."""
        return Rider([self._options_crc, *local.record()],
                     lambda record_WF: self.conclude(record_WF, local, guess))

    def conclude(self, record_WF: torch.Tensor, local: LocalStep,
                 guess: Agreed | None = None) -> Agreed:
        """What every rank's record says; the same typed error on every rank if anything is
        wrong, Misguessed if the call was sent under a `guess` that turned out wrong."""
        col = {name: record_WF[:, 1 + i].tolist() for i, name in enumerate(_COLUMNS)}
        problems = col["problem"]
        crcs = set(record_WF[:, 0].tolist())
        if len(crcs) > 1 or any(code not in (OK, RECONFIGURED) for code in problems):
            self._raise(local, problems)
        self._agreed_crc = crcs.pop()
        shown = {"dtype": ("input dtype", local.dtype),
                 "device": ("input device type", local.device_type),
                 "graph": ("autograd state (graph built through the layer)", _graph_text(local))}
        for name, (what, mine) in shown.items():
            if len(set(col[name])) > 1:
                values = self._swap(mine)
                raise InputError(
                    f"the {what} differs across the ranks of the EP group ("
                    + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                    + "); every rank must call the layer alike (same dtype and device type, "
                    "all in training with grad enabled or all under no_grad)")
        agreed = Agreed(max(col["limit"]), any(col["input_grad"]), tuple(col["layout"]),
                        local.dtype)
        if RECONFIGURED in problems:  # every rank changed its options alike
            raise Misguessed(agreed, resync=True)
        if guess is not None and not agreed.same_call(guess):
            raise Misguessed(agreed)
        return agreed

    # -- the error path: every rank takes it together ------------------------------------------

    def _raise(self, local: LocalStep, problems: list[int]) -> None:
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
            error = StepError(f"the layer failed before its exchange on rank(s) {failed} ({text}); "
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
