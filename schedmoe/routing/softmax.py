"""Softmax routers: softmax then top-k (GShard, Mixtral, Qwen-MoE, OLMoE), or top-k of the
logits then softmax over the k (GPT-OSS).

Legend: T tokens, M model dim, E experts (global), K top-k.
"""

from __future__ import annotations

import torch

from ..registry import register_gate
from .base import Router, Routing, z_loss


@register_gate("topk")
class TopKRouter(Router):
    """Linear gate, softmax over all experts, top-k.

    normalize_weights: rescale the k chosen probabilities to sum to 1 (Mixtral always; Qwen-MoE
    and OLMoE when `norm_topk_prob`), for k > 1 only unless `normalize_single`: with k = 1
    the weight would be 1 and the router would get no gradient from the task (Switch keeps p).
    normalize_single: rescale for k = 1 too (transformers' Mixtral, Qwen-MoE and OLMoE do).
    noise_std: std of Gaussian noise added to the logits in training (exploration); 0 disables.
    bias: a learnt bias on the logits.
    """

    def __init__(self, model_dim: int, num_experts: int, top_k: int, *,
                 normalize_weights: bool = True, noise_std: float = 0.0, bias: bool = False,
                 normalize_single: bool = False) -> None:
        super().__init__(model_dim, num_experts, top_k, bias)
        self.normalize_weights = normalize_weights and (top_k > 1 or normalize_single)
        self.noise_std = noise_std

    def forward(self, x_TM: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TM)
        if self.training and self.noise_std > 0:
            logits_TE = logits_TE + self.noise_std * torch.randn_like(logits_TE)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_p_TK, expert_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        weight_TK = top_p_TK
        if self.normalize_weights:
            weight_TK = top_p_TK / top_p_TK.sum(dim=-1, keepdim=True)
        return Routing(probs_TE, expert_TK, weight_TK, z_loss(logits_TE))


@register_gate("topk_softmax")
class TopKSoftmaxRouter(Router):
    """Top-k of the logits, then softmax over the k chosen (GPT-OSS); the weights always sum
    to 1, so `normalize_weights` has nothing to do. bias: a learnt bias on the logits (GPT-OSS
    has one). The balance loss uses the softmax over all experts."""

    def __init__(self, model_dim: int, num_experts: int, top_k: int, *,
                 normalize_weights: bool = True, noise_std: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__(model_dim, num_experts, top_k, bias)
        self.noise_std = noise_std

    def forward(self, x_TM: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TM)
        if self.training and self.noise_std > 0:
            logits_TE = logits_TE + self.noise_std * torch.randn_like(logits_TE)
        top_logits_TK, expert_TK = torch.topk(logits_TE, self.top_k, dim=-1)
        weight_TK = torch.softmax(top_logits_TK, dim=-1)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        return Routing(probs_TE, expert_TK, weight_TK, z_loss(logits_TE))
