"""The sequential schedule: one exchange, all experts, one exchange back; nothing overlaps."""

from __future__ import annotations

import torch

from ..registry import register_scheduler
from .base import Scheduler, StepContext


@register_scheduler("sequential")
class SequentialScheduler(Scheduler):
    """compress -> A2A -> decompress -> experts -> compress -> A2A -> decompress."""

    carries_agreement = True

    def run(self, x_WECM: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        recv_WECM = ctx.dispatch(x_WECM)
        y_WECM = ctx.run_experts(recv_WECM)
        return ctx.combine(y_WECM)
