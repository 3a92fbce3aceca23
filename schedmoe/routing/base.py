"""The router interface, its output, and the auxiliary losses routers share.

Legend: T tokens, M model dim, E experts (global), K top-k.

Every router computes in fp32 whatever the input dtype (the layer also disables autocast
around it), so that every rank and every precision picks experts alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    """A router's decision for T tokens."""

    probs_TE: torch.Tensor  # fp32 per-expert probabilities (what the balance loss averages)
    expert_TK: torch.Tensor  # int64 chosen experts
    weight_TK: torch.Tensor  # fp32 combine weights of the chosen experts
    z_loss: torch.Tensor  # router z-loss, mean(logsumexp(logits)^2) (scalar)
    # A custom router's own balance loss; None: the layer's `balance_loss` form (balance.py)
    balance_loss: torch.Tensor | None = None


class Router(nn.Module):
    """Base class of routers: `forward(x_TM) -> Routing`.

    Subclasses keep the constructor signature `(model_dim, num_experts, top_k, *,
    normalize_weights, noise_std, **options)`; `options` come from `MoELayer(gate_options=...)`.
    The gate weight is `wg_EM` ([E, M], like a Linear's), a bias if any `bias_E`.
    """

    def __init__(self, model_dim: int, num_experts: int, top_k: int, bias: bool = False) -> None:
        super().__init__()
        self.model_dim, self.num_experts, self.top_k = model_dim, num_experts, top_k
        self.wg_EM = nn.Parameter(torch.empty(num_experts, model_dim, dtype=torch.float32))
        nn.init.normal_(self.wg_EM, std=model_dim ** -0.5)
        self.bias_E = nn.Parameter(torch.zeros(num_experts)) if bias else None

    def logits(self, x_TM: torch.Tensor) -> torch.Tensor:
        """fp32 logits [T, E]."""
        bias = None if self.bias_E is None else self.bias_E.float()
        return torch.nn.functional.linear(x_TM.float(), self.wg_EM.float(), bias)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: keeps the logits small for numerical stability."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum()
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
