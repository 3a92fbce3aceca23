"""Shared experts: always-on experts that every token goes through, beside the routed ones.

Legend: T tokens, M model dim, H hidden dim of the shared MLP.

DeepSeek-V3 adds n shared experts of size I unscaled (one MLP of hidden size n * I is the same
function); Qwen2-MoE scales its shared expert per token by sigmoid(x @ w_gate). The shared MLP
is replicated on every rank (a data-parallel parameter, like the router), so it needs no
exchange; the layer adds its output to the combined routed output.
"""

from __future__ import annotations

import torch
from torch import nn

from .forms import Expert


class SharedExperts(nn.Module):
    """`forward(x_TM) -> y_TM`: the shared MLP (an expert form with one expert), optionally
    times sigmoid(x @ gate_1M^T)."""

    def __init__(self, mlp: Expert, gate: bool) -> None:
        super().__init__()
        self.mlp = mlp
        model_dim = mlp.model_dim
        self.gate_1M = nn.Parameter(torch.empty(1, model_dim).uniform_(
            -model_dim ** -0.5, model_dim ** -0.5)) if gate else None

    def forward(self, x_TM: torch.Tensor) -> torch.Tensor:
        dtype = next(self.mlp.parameters()).dtype
        y_TM = self.mlp(x_TM.to(dtype).unsqueeze(0)).squeeze(0).to(x_TM.dtype)
        if self.gate_1M is not None:
            y_TM = y_TM * torch.sigmoid(x_TM @ self.gate_1M.to(x_TM.dtype).t())
        return y_TM
