"""One differentiable compress -> all-to-all -> decompress of a `[P, ...]` payload.

Fixed-size codecs exchange their wire with even splits. Data-dependent codecs (zstd) first
exchange each slice's byte count, then the wire with those uneven splits, through the same A2A
algorithm. The backward pass sends the gradient back the same way with the gradient codec; for
a lossy codec the gradient is straight-through (the round trip is treated as the identity).
"""

from __future__ import annotations

import torch

from .a2a_algos.base import A2AAlgorithm
from .ops.compressor import Compressor, SliceSpec, Wire
from .recorder import StepRecorder


def send(x_P: torch.Tensor, a2a: A2AAlgorithm, codec: Compressor, rec: StepRecorder,
         name: str) -> torch.Tensor:
    """Slice p of `x_P` to rank p; returns the slices received, by source rank."""
    spec = SliceSpec(tuple(x_P.shape[1:]), x_P.dtype)
    with rec(name + ".compress"):
        wire = codec.compress(x_P)
    with rec(name + ".a2a"):
        if codec.fixed_size:
            recv_sizes = wire.sizes
            data = a2a.exchange(wire.data)
        else:
            sizes_P = torch.tensor(wire.sizes, dtype=torch.int64, device=wire.data.device)
            recv_sizes = a2a.exchange(sizes_P).tolist()
            data = a2a.exchange(wire.data, recv_sizes, wire.sizes)
    rec.count_bytes(name, x_P.numel() * x_P.element_size(), wire.data.numel())
    with rec(name + ".decompress"):
        return codec.decompress(Wire(data, recv_sizes), spec)


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_P, a2a, codec, grad_codec, rec, name):  # type: ignore[override]
        ctx.a2a, ctx.grad_codec, ctx.rec, ctx.name = a2a, grad_codec, rec, name
        return send(x_P, a2a, codec, rec, name)

    @staticmethod
    def backward(ctx, grad_P):  # type: ignore[override]
        grad = send(grad_P.contiguous(), ctx.a2a, ctx.grad_codec, ctx.rec, ctx.name + ".bwd")
        return grad, None, None, None, None, None


def exchange(x_P: torch.Tensor, a2a: A2AAlgorithm, codec: Compressor, grad_codec: Compressor,
             rec: StepRecorder, name: str) -> torch.Tensor:
    """Differentiable `send`; the gradient travels back with `grad_codec`."""
    return _Exchange.apply(x_P, a2a, codec, grad_codec, rec, name)
