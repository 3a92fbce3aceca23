"""Flat all-to-all: one all_to_all_single over the whole EP group (registered as `nccl`)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed import collective
from ..registry import register_a2a
from .base import A2AAlgorithm, A2AHandle, Splits


@register_a2a("nccl")
class FlatA2A(A2AAlgorithm):
    """The backend's own all_to_all_single (NCCL on GPUs, gloo on CPUs)."""

    def start(self, x: torch.Tensor, output_splits: Splits = None,
              input_splits: Splits = None) -> A2AHandle:
        rows = self.output_rows(x, output_splits, input_splits)
        if not self.group.distributed:
            return A2AHandle(lambda: x)
        out = x.new_empty((rows, *x.shape[1:]))
        what = "all-to-all (nccl)"
        with collective(what, self.group):
            work = dist.all_to_all_single(
                out, x.contiguous(),
                None if output_splits is None else list(output_splits),
                None if input_splits is None else list(input_splits),
                group=self.group.pg, async_op=True,
            )

        def wait() -> torch.Tensor:
            with collective(what, self.group):
                work.wait()
            return out

        return A2AHandle(wait)
