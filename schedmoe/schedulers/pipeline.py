"""The pipelined schedule with a fixed degree r, in ScheMoE's optimal order (Theorem 1).

Legend: W ranks, E local experts, C capacity, M model dim; chunk i holds capacity slots
[lo_i, hi_i) of every expert (r chunks as even as possible; a C that r does not divide gives
chunks one slot apart).

Forward, compute order: C1^1..C1^r | D1^1 E^1 C2^1 | ... | D1^r E^r C2^r | D2^1..D2^r. Each A2A is
issued as soon as its input is compressed (async handle), so every dispatch A2A is issued before
any combine A2A and chunk i's exchanges overlap chunk i-1's expert work.

Backward is explicit and mirrors it: the combine gradients of all chunks are issued first; then
per chunk: wait, expert backward through the graph saved in forward, compress, issue the
dispatch gradient; then all final decompressions.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..exchange import start_send
from ..registry import register_scheduler
from .base import Scheduler, StepContext


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


class _PipelinedRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_WECM, step: StepContext, degree: int, *expert_params):  # type: ignore[override]
        bounds = chunk_bounds(x_WECM.shape[2], degree)
        dispatches = [start_send(x_WECM[:, :, lo:hi].contiguous(), step.a2a,
                                 step.codecs.dispatch, step.rec, "dispatch", i)
                      for i, (lo, hi) in enumerate(bounds)]
        saved, combines = [], []
        for i, pending in enumerate(dispatches):
            received = pending.wait()
            with torch.enable_grad():
                x_in = received.detach().requires_grad_()
                y = step.run_experts(x_in, chunk=i)
            saved.append((x_in, y))
            combines.append(start_send(y.detach(), step.a2a, step.codecs.combine, step.rec,
                                       "combine", i))
        ctx.step, ctx.saved, ctx.bounds = step, saved, bounds
        return torch.cat([pending.wait() for pending in combines], dim=2)

    @staticmethod
    def backward(ctx, grad_WECM):  # type: ignore[override]
        step = ctx.step
        grads = [start_send(grad_WECM[:, :, lo:hi].contiguous(), step.a2a,
                            step.codecs.combine_grad, step.rec, "combine.bwd", i)
                 for i, (lo, hi) in enumerate(ctx.bounds)]
        back = []
        for i, pending in enumerate(grads):
            grad_y = pending.wait()
            x_in, y = ctx.saved[i]
            with torch.enable_grad(), step.rec("experts.bwd", i):
                torch.autograd.backward(y, grad_y)
            grad_in = x_in.grad if x_in.grad is not None else torch.zeros_like(x_in)
            # Sent even when the tokens need no gradient: every rank runs the same exchanges.
            back.append(start_send(grad_in, step.a2a, step.codecs.dispatch_grad, step.rec,
                                   "dispatch.bwd", i))
        ctx.saved = None
        grad_x = torch.cat([pending.wait() for pending in back], dim=2)
        # The experts' parameter gradients were accumulated by the per-chunk backward above.
        return (grad_x, None, None) + (None,) * len(ctx.needs_input_grad[3:])


@register_scheduler("pipeline")
class PipelineScheduler(Scheduler):
    """Split the capacity into `degree` chunks and overlap their exchanges with expert work."""

    def __init__(self, degree: int = 2) -> None:
        if not isinstance(degree, int) or degree < 1:
            raise ConfigError(f"pipeline degree must be a positive int, got {degree!r}")
        self.degree = degree

    def describe(self) -> str:
        return f"pipeline(degree={self.degree})"

    def run(self, x_WECM: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        # The expert parameters are inputs so that the region is differentiated even when the
        # tokens need no gradient.
        return _PipelinedRegion.apply(x_WECM, ctx, self.degree, *ctx.experts.parameters())
