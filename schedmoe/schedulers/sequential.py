"""The sequential schedule: one exchange, all experts, one exchange back; nothing overlaps.

Legend: P the payload in the call's layout (`[W, E, C, M]` padded, `[N, M]` ragged rows).
"""

from __future__ import annotations

import torch

from ..registry import register_scheduler
from .base import Scheduler, StepContext


@register_scheduler("sequential")
class SequentialScheduler(Scheduler):
    """compress -> A2A -> decompress -> experts -> compress -> A2A -> decompress."""

    carries_agreement = True

    def run(self, x_P: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        recv_P = ctx.dispatch(x_P)
        y_P = ctx.run_experts(recv_P)
        return ctx.combine(y_P)
