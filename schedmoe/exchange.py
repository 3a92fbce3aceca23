"""One differentiable compress -> all-to-all -> decompress of a `[P, ...]` payload.

The backward pass sends the gradient back the same way, compressed with the backward codec.
For a lossy codec the gradient is straight-through: d(decompress(compress(x)))/dx := identity,
so the incoming gradient is exchanged (and itself compressed) as if the round trip were exact.
"""

from __future__ import annotations

import torch

from .a2a_algos.base import A2AAlgorithm
from .ops.compressor import Compressor, SliceSpec
from .timing import OpTimer


def _send(x_P: torch.Tensor, a2a: A2AAlgorithm, codec: Compressor, timer: OpTimer,
          name: str) -> torch.Tensor:
    spec = SliceSpec(tuple(x_P.shape[1:]), x_P.dtype)
    with timer(name + ".compress"):
        wire_P = codec.compress(x_P)
    with timer(name + ".a2a"):
        wire_P = a2a.exchange(wire_P.contiguous())
    with timer(name + ".decompress"):
        return codec.decompress(wire_P, spec)


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_P, a2a, codec, grad_codec, timer, name):  # type: ignore[override]
        ctx.a2a, ctx.grad_codec, ctx.timer, ctx.name = a2a, grad_codec, timer, name
        return _send(x_P, a2a, codec, timer, name)

    @staticmethod
    def backward(ctx, grad_P):  # type: ignore[override]
        grad = _send(grad_P.contiguous(), ctx.a2a, ctx.grad_codec, ctx.timer, ctx.name + ".bwd")
        return grad, None, None, None, None, None


def exchange(x_P: torch.Tensor, a2a: A2AAlgorithm, codec: Compressor, grad_codec: Compressor,
             timer: OpTimer, name: str) -> torch.Tensor:
    """Send slice p of `x_P` to rank p; returns the slices received, by source rank."""
    return _Exchange.apply(x_P, a2a, codec, grad_codec, timer, name)
