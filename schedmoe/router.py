"""Routers ("gates"): which k experts each token goes to, with what weight, and the aux losses.

Legend: T tokens, M model dim, E experts (global), K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .registry import register_gate


@dataclass
class Routing:
    """A router's decision for T tokens."""

    probs_TE: torch.Tensor  # fp32 softmax over all experts
    expert_TK: torch.Tensor  # int64 chosen experts, best first
    weight_TK: torch.Tensor  # fp32 combine weights of the chosen experts
    balance_loss: torch.Tensor  # GShard load-balancing loss (scalar)
    z_loss: torch.Tensor  # router z-loss, mean(logsumexp(logits)^2) (scalar)


class Router(nn.Module):
    """Base class of routers: `forward(x_TM) -> Routing`.

    Subclasses keep the constructor signature `(model_dim, num_experts, top_k, **options)`.
    """

    def __init__(self, model_dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.model_dim, self.num_experts, self.top_k = model_dim, num_experts, top_k


@register_gate("topk")
class TopKRouter(Router):
    """Linear gate in fp32, softmax, top-k.

    normalize_weights: rescale the k chosen probabilities to sum to 1 (only matters for k > 1).
    noise_std: std of Gaussian noise added to the logits in training (exploration); 0 disables.
    """

    def __init__(self, model_dim: int, num_experts: int, top_k: int,
                 normalize_weights: bool = True, noise_std: float = 0.0) -> None:
        super().__init__(model_dim, num_experts, top_k)
        self.normalize_weights = normalize_weights
        self.noise_std = noise_std
        self.wg_EM = nn.Parameter(torch.empty(num_experts, model_dim, dtype=torch.float32))
        nn.init.normal_(self.wg_EM, std=model_dim ** -0.5)

    def forward(self, x_TM: torch.Tensor) -> Routing:
        logits_TE = x_TM.float() @ self.wg_EM.float().t()
        if self.training and self.noise_std > 0:
            logits_TE = logits_TE + self.noise_std * torch.randn_like(logits_TE)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_p_TK, expert_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        weight_TK = top_p_TK
        if self.normalize_weights and self.top_k > 1:
            weight_TK = top_p_TK / top_p_TK.sum(dim=-1, keepdim=True)
        return Routing(probs_TE, expert_TK, weight_TK,
                       balance_loss(probs_TE, expert_TK[:, 0]), z_loss(logits_TE))


def balance_loss(probs_TE: torch.Tensor, top1_T: torch.Tensor) -> torch.Tensor:
    """GShard: E * sum_e mean_prob(e) * fraction_of_top1(e); 1.0 when perfectly balanced."""
    num_tokens, num_experts = probs_TE.shape
    if num_tokens == 0:
        return probs_TE.sum()  # zero, and still part of the graph
    fraction_E = torch.bincount(top1_T, minlength=num_experts).float() / num_tokens
    return num_experts * torch.sum(probs_TE.mean(dim=0) * fraction_E)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: keeps the logits small for numerical stability."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum()
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
