"""One differentiable compress -> all-to-all -> decompress of a `[P, ...]` payload, or of
ragged `[N, ...]` rows with per-rank row counts (`splits`, rows without padding).

Fixed-size codecs exchange their wire with even splits. Data-dependent codecs (zstd) first
exchange each slice's byte count, then the wire with those uneven splits, through the same A2A
algorithm. Ragged rows go through `Compressor.compress_rows` (each destination's rows a slice of
their own; the `none` codec sends them as they are); the receiver knows each slice's byte size
from the rows it expects (`Compressor.wire_bytes`) or, for zstd, swaps them. The backward pass
sends the gradient back the same way with the gradient codec; for a lossy codec the gradient
is straight-through (the round trip is treated as the identity).

Where each part runs (streams/lanes.py): compress and issue on the call's `codec` lane, the
arrival on its `comm` lane, the decompression on its `decode` lane after it, and the result
handed to the calling lane; all one lane on CPUs.

A call's first dispatch may carry a `Rider` (the per-call agreement record, control/rider.py):
appended to every slice after compression and split off on arrival; the agreement checks it
once the call's exchanges are issued, before the layer decodes anything.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Protocol

import torch
import torch.distributed._functional_collectives as funcol

from ..a2a_algos.base import A2AAlgorithm
from ..ops.codecs import checks
from ..ops.codecs.compressor import Compressor, SliceSpec, Wire
from ..streams.lanes import INLINE, Lanes
from . import events


class Rider(Protocol):
    """What may ride on a call's first dispatch: the per-call agreement record
    (control/rider.py), appended after compression and split off on arrival."""

    def attach(self, wire: Wire) -> Wire: ...

    def detach(self, data: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, list[int]]: ...


class StepRecorder(Protocol):
    """What times the ops of a call (control/recorder.py)."""

    def __call__(self, op: str, chunk: int | None = None) -> ContextManager: ...

    def now(self) -> object: ...  # a mark: host seconds or a CUDA event

    def interval(self, op: str, start: object, chunk: int | None = None,
                 stream: str = "compute") -> None: ...

    def count_bytes(self, name: str, raw: int, wire: int) -> None: ...


Splits = tuple[list[int], list[int]]  # ragged: rows sent to each rank, rows received from each


class PendingSend:
    """An exchange in flight: `wait()` finishes the A2A and decompresses. Its start, its wait
    and its arrival are events (events.py) for the features built on top: another micro-batch
    computes while it waits (overlap/turns.py), gradient chunks go out once none is in flight
    (overlap/link.py). On lanes that overlap (CUDA streams, streams/lanes.py), `wait()` blocks
    nothing: the `comm` lane waits for the arrival, the `decode` lane decompresses after it and
    the calling lane waits for the decompressed tensor."""

    def __init__(self, handle, recv_sizes: list[int],
                 decode: Callable[[torch.Tensor, list[int]], torch.Tensor], rec: StepRecorder,
                 name: str, chunk: int | None, issued: object, rider: Rider | None = None,
                 lanes: Lanes = INLINE, token: object = None) -> None:
        self._handle, self._recv_sizes, self._decode = handle, recv_sizes, decode
        self._rec, self._name, self._chunk, self._issued = rec, name, chunk, issued
        self._rider, self._lanes, self._token = rider, lanes, token
        events.started(self)

    def wait(self) -> torch.Tensor:
        lanes = self._lanes
        try:
            # The host blocks here only for exchanges driven from the host (gloo, staged).
            with events.waiting(), lanes.on("comm", after=None):
                lanes.arrive(self._token)
                data, sizes = self._handle.wait(), self._recv_sizes
                # issue (on the codec lane) to arrival (on the comm lane)
                self._rec.interval(self._name + ".a2a", self._issued, self._chunk,
                                   stream="comm")
        finally:
            events.arrived(self)
        with lanes.on("decode", data, after="comm"):
            if self._rider is not None:  # concluded once the call is issued (agreement.py)
                data, sizes = self._rider.detach(data, sizes)
            # Payload checks run on the device and are read later (ops/codecs/checks.py).
            with self._rec(self._name + ".decompress", self._chunk), checks.deferred():
                out = self._decode(data, sizes)
        lanes.join("decode", out)
        return out


def start_send(x_P: torch.Tensor, a2a: A2AAlgorithm, codec: Compressor, rec: StepRecorder,
               name: str, chunk: int | None = None, rider: Rider | None = None,
               splits: Splits | None = None, lanes: Lanes = INLINE) -> PendingSend:
    """Compress slice p of `x_P` for rank p and issue the exchange without waiting for it,
    both on the `codec` lane. A data-dependent codec's slice sizes are exchanged first
    (blocking, a few bytes). With `splits` (a ragged layout), `x_P` is `[N, ...]` rows and
    slice p is the next `splits[0][p]` of them; `splits[1][p]` rows arrive from rank p."""
    with lanes.on("codec", x_P):
        if splits is not None:
            return _start_ragged(x_P, a2a, codec, rec, name, chunk, splits, lanes)
        spec = SliceSpec(tuple(x_P.shape[1:]), x_P.dtype)
        with rec(name + ".compress", chunk):
            wire = codec.compress(x_P)
            if rider is not None:
                wire = rider.attach(wire)
        issued = rec.now()  # the exchange's time includes a data-dependent codec's size swap
        even = codec.fixed_size  # every slice the same size: no split sizes
        recv_sizes = wire.sizes if even else _swap_sizes(wire, a2a)
        return _issue(wire, recv_sizes, even, a2a, rec, name, chunk, issued, x_P, lanes,
                      lambda data, sizes: codec.decompress(Wire(data, sizes), spec), rider)


def _swap_sizes(wire: Wire, a2a: A2AAlgorithm) -> list[int]:
    """The byte sizes of the slices to arrive (a data-dependent codec: swapped, blocking)."""
    sizes_P = torch.tensor(wire.sizes, dtype=torch.int64, device=wire.data.device)
    return a2a.exchange(sizes_P).tolist()


def _issue(wire: Wire, recv_sizes: list[int], even: bool, a2a: A2AAlgorithm,
           rec: StepRecorder, name: str, chunk: int | None, issued: object, x_P: torch.Tensor,
           lanes: Lanes, decode: Callable[[torch.Tensor, list[int]], torch.Tensor],
           rider: Rider | None = None) -> PendingSend:
    """Issue the exchange of `wire` from the current (codec) lane (`even`: without split
    sizes, every slice the same size)."""
    with lanes.issuing() as token:
        handle = a2a.start(wire.data) if even else a2a.start(wire.data, recv_sizes, wire.sizes)
    rec.count_bytes(name, x_P.numel() * x_P.element_size(), wire.data.numel())
    return PendingSend(handle, recv_sizes, decode, rec, name, chunk, issued, rider, lanes,
                       token)


def _start_ragged(x_NM: torch.Tensor, a2a: A2AAlgorithm, codec: Compressor, rec: StepRecorder,
                  name: str, chunk: int | None, splits: Splits, lanes: Lanes) -> PendingSend:
    """Each rank's rows compressed as a slice of its own; the receiver knows the byte sizes
    from the rows it expects (fixed-size codecs) or they are exchanged first (zstd)."""
    send_rows, recv_rows = splits
    row_shape = tuple(x_NM.shape[1:])
    codec = codec.without_feedback()
    with rec(name + ".compress", chunk):
        wire = codec.compress_rows(x_NM, send_rows)
    issued = rec.now()
    specs = [SliceSpec((rows, *row_shape), x_NM.dtype) for rows in recv_rows]
    recv_sizes = [codec.wire_bytes(spec) for spec in specs]
    if any(size is None for size in recv_sizes):
        recv_sizes = _swap_sizes(wire, a2a)

    def decode(received: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        return codec.decompress_rows(Wire(received, sizes), specs)

    return _issue(wire, recv_sizes, False, a2a, rec, name, chunk, issued, x_NM, lanes, decode)


def send(x_P: torch.Tensor, a2a: A2AAlgorithm, codec: Compressor, rec: StepRecorder,
         name: str, chunk: int | None = None, rider: Rider | None = None,
         splits: Splits | None = None, lanes: Lanes = INLINE) -> torch.Tensor:
    """Slice p of `x_P` to rank p; returns the slices received, by source rank."""
    if torch.compiler.is_compiling() and a2a.group.distributed:
        return _send_traced(x_P, a2a, codec)
    return start_send(x_P, a2a, codec, rec, name, chunk, rider, splits, lanes).wait()


def _send_traced(x_P: torch.Tensor, a2a: A2AAlgorithm, codec: Compressor) -> torch.Tensor:
    """`send` inside a compiled graph (layer.py traces only padded rows, a traceable A2A and
    fixed-size codecs there): one functional all_to_all_single, which the compiler schedules
    and waits for itself. Headers are not checked here (the graph cannot raise on the host)."""
    spec = SliceSpec(tuple(x_P.shape[1:]), x_P.dtype)
    wire = codec.compress(x_P)
    data = funcol.all_to_all_single(wire.data, wire.sizes, wire.sizes, a2a.group.pg)
    return codec.decompress(Wire(data, wire.sizes), spec)


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_P, a2a, codec, grad_codec, rec, name, chunk,  # type: ignore[override]
                rider, splits, lanes):
        ctx.a2a, ctx.grad_codec, ctx.rec, ctx.name, ctx.chunk = a2a, grad_codec, rec, name, chunk
        ctx.splits, ctx.lanes = splits, lanes
        return send(x_P, a2a, codec, rec, name, chunk, rider, splits, lanes)

    @staticmethod
    def backward(ctx, grad_P):  # type: ignore[override]
        # Autograd runs this on the forward's stream: the same compute lane.
        back = None if ctx.splits is None else (ctx.splits[1], ctx.splits[0])
        grad = send(grad_P.contiguous(), ctx.a2a, ctx.grad_codec, ctx.rec, ctx.name + ".bwd",
                    ctx.chunk, splits=back, lanes=ctx.lanes)
        return (grad,) + (None,) * 9


def exchange(x_P: torch.Tensor, a2a: A2AAlgorithm, codec: Compressor, grad_codec: Compressor,
             rec: StepRecorder, name: str, chunk: int | None = None,
             rider: Rider | None = None, splits: Splits | None = None,
             lanes: Lanes = INLINE) -> torch.Tensor:
    """Differentiable `send`; the gradient travels back with `grad_codec` (reversed splits)."""
    return _Exchange.apply(x_P, a2a, codec, grad_codec, rec, name, chunk, rider, splits, lanes)
