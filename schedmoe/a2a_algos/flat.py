"""Flat all-to-all: one all_to_all_single over the whole EP group (registered as `nccl`)."""

from __future__ import annotations

import torch

from ..registry import register_a2a
from .base import A2AAlgorithm, A2AHandle, start_all_to_all


@register_a2a("nccl")
class FlatA2A(A2AAlgorithm):
    """The backend's own all_to_all_single (NCCL on GPUs, gloo on CPUs)."""

    traceable = True

    def _start(self, x: torch.Tensor, send: list[int], recv: list[int],
               even: bool) -> A2AHandle:
        return A2AHandle(start_all_to_all(x, recv, send, self.group, "all-to-all (nccl)"))
