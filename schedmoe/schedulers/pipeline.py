"""The pipelined schedule with a fixed degree r, in ScheMoE's optimal order (Theorem 1).

Legend: W ranks, E local experts, C capacity, M model dim, P the payload in the call's layout
(`[W, E, C, M]` padded, `[N, M]` ragged rows; plan/layout.py); chunk i holds capacity slots
[lo_i, hi_i) of every expert (r chunks as even as possible; a C that r does not divide gives
chunks one slot apart).

Forward, compute order: C1^1..C1^r | S | D1^1 E^1 C2^1 | ... | D1^r E^r C2^r | D2^1..D2^r, S being the
shared experts (if any; ordinary autograd, outside the region). Each A2A is
issued as soon as its input is compressed (async handle), so every dispatch A2A is issued before
any combine A2A and chunk i's exchanges overlap chunk i-1's expert work.

Backward is explicit and mirrors it: the combine gradients of all chunks are issued first; then
per chunk: wait, expert backward through the graph saved in forward (its parameter gradients go
back to the autograd engine), compress, issue the dispatch gradient; then all final
decompressions.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..exchange.send import PendingSend
from ..registry import register_scheduler
from .base import Scheduler, StepContext


def start_dispatches(x_P: torch.Tensor, step: StepContext, degree: int) -> list[PendingSend]:
    """Compress and issue every chunk's dispatch (C1^1..C1^r), in order."""
    return [step.start_dispatch(step.slice(x_P, i), i)
            for i in range(len(step.chunks(degree)))]


def pipelined_forward(x_P: torch.Tensor, step: StepContext, degree: int, graph: bool,
                      dispatches: list[PendingSend]
                      ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The forward order after the dispatches were issued. With `graph`, each chunk's experts
    build their own graph from a leaf holding the received tokens; returns (y_P, the
    leaves, the chunk outputs)."""
    leaves, outs, combines = [], [], []
    for i, pending in enumerate(dispatches):
        received = pending.wait()
        with torch.set_grad_enabled(graph):
            x_in = received.detach().requires_grad_(graph)
            y = step.run_experts(x_in, chunk=i, time_backward=False)  # timed below
        leaves.append(x_in)
        outs.append(y)
        combines.append(step.start_send(y.detach(), "combine", i, towards_experts=False))
    return step.cat([pending.wait() for pending in combines]), leaves, outs


class _PipelinedRegion(torch.autograd.Function):
    """The region as one autograd node. The per-chunk expert graphs hang off tensors saved with
    save_for_backward, so the engine owns their lifetime: freed after a backward, kept by
    retain_graph=True, recomputed by activation checkpointing. Parameter gradients are returned
    to the engine (autograd.grad and gradient hooks see them), not written into .grad."""

    @staticmethod
    def forward(ctx, x_P, step: StepContext, degree: int,  # type: ignore[override]
                dispatches: list[PendingSend], *expert_params):
        y_P, leaves, outs = pipelined_forward(x_P, step, degree, True, dispatches)
        ctx.step, ctx.bounds = step, dict(step.bounds)
        ctx.save_for_backward(*leaves, *outs)
        return y_P

    @staticmethod
    def backward(ctx, grad_P):  # type: ignore[override]
        step, chunks = ctx.step, len(ctx.bounds)
        step.bounds.clear()  # the forward's chunks
        step.bounds.update(ctx.bounds)
        saved = ctx.saved_tensors
        leaves, outs = saved[:chunks], saved[chunks:]
        params = [p for p, needed in zip(step.experts.parameters(), ctx.needs_input_grad[4:])
                  if needed]
        grads = [step.start_send(step.slice(grad_P, i), "combine.bwd", i, towards_experts=True)
                 for i in range(chunks)]
        back, param_grads = [], [None] * len(params)
        for i, pending in enumerate(grads):
            grad_y = pending.wait()
            with step.rec("experts.bwd", i):
                # retain_graph: the chunk graph lives as long as the saved tensors, which the
                # engine frees after this backward unless the caller retains the graph.
                found = torch.autograd.grad(outs[i], [leaves[i], *params], grad_y,
                                            retain_graph=True, allow_unused=True)
            grad_in = found[0] if found[0] is not None else torch.zeros_like(leaves[i])
            for k, g in enumerate(found[1:]):
                if g is not None:
                    param_grads[k] = g if param_grads[k] is None else param_grads[k] + g
            # Sent even when the tokens need no gradient: every rank runs the same exchanges.
            back.append(step.start_send(grad_in, "dispatch.bwd", i, towards_experts=False))
        grad_x = step.cat([pending.wait() for pending in back])
        it = iter(param_grads)
        return (grad_x, None, None, None) + tuple(
            next(it) if needed else None for needed in ctx.needs_input_grad[4:])


@register_scheduler("pipeline")
class PipelineScheduler(Scheduler):
    """Split the capacity into `degree` chunks and overlap their exchanges with expert work."""

    carries_agreement = True

    def __init__(self, degree: int = 2) -> None:
        if not isinstance(degree, int) or degree < 1:
            raise ConfigError(f"pipeline degree must be a positive int, got {degree!r}")
        self.degree = degree

    def describe(self) -> str:
        return f"pipeline(degree={self.degree})"

    def run(self, x_P: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Traced: the same chunks through differentiable exchanges; the compiler orders
            # the work and derives the backward itself.
            return ctx.cat([ctx.combine(ctx.run_experts(ctx.dispatch(ctx.slice(x_P, i), i), i), i)
                            for i in range(len(ctx.chunks(self.degree)))])
        params = list(ctx.experts.parameters())
        differentiable = torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and (
            x_P.requires_grad or any(p.requires_grad for p in params))
        dispatches = start_dispatches(x_P, ctx, self.degree)
        ctx.run_shared()  # the shared experts overlap the dispatches in flight
        if not differentiable:  # no_grad / inference: no graph anywhere
            return pipelined_forward(x_P, ctx, self.degree, False, dispatches)[0]
        # The expert parameters are inputs so that the region is differentiated even when the
        # tokens need no gradient.
        return _PipelinedRegion.apply(x_P, ctx, self.degree, dispatches, *params)
