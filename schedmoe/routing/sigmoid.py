"""DeepSeek-V3's router: sigmoid scores, a selection-only bias, group-limited top-k, a routed
scaling factor.

Legend: T tokens, M model dim, E experts (global), K top-k, G expert groups, E/G per group.

Selection uses scores + `score_bias_E` (the bias of auxiliary-loss-free balancing: it changes
which experts are chosen, never their weights). With `num_groups` G > 1, the experts form G
contiguous groups; each group is ranked by the sum of its two best biased scores, the best
`topk_groups` are kept and the top-k is taken among their experts. The weights are the unbiased
scores of the chosen experts, renormalised if `normalize_weights`, times `scaling`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..registry import register_gate
from ..streams.lanes import lanes_for
from .base import Router, Routing, z_loss
from .capacity import count_per_expert


@register_gate("sigmoid_grouped")
class GroupLimitedSigmoidRouter(Router):
    def __init__(self, model_dim: int, num_experts: int, top_k: int, *,
                 normalize_weights: bool = True, noise_std: float = 0.0, num_groups: int = 1,
                 topk_groups: int = 1, scaling: float = 1.0, bias: bool = False,
                 bias_update_rate: float = 0.0) -> None:
        super().__init__(model_dim, num_experts, top_k, bias)
        if num_groups < 1 or num_experts % num_groups:
            raise ConfigError(f"num_groups ({num_groups}) must divide num_experts ({num_experts})")
        if not 1 <= topk_groups <= num_groups:
            raise ConfigError(f"topk_groups ({topk_groups}) must be in 1..num_groups "
                              f"({num_groups})")
        if num_groups > 1 and num_experts // num_groups < 2:
            raise ConfigError("group-limited routing ranks groups by their two best experts: "
                              "each group needs at least 2 experts")
        if top_k > topk_groups * (num_experts // num_groups):
            raise ConfigError(f"top_k ({top_k}) exceeds the experts of the {topk_groups} groups "
                              "kept")
        self.normalize_weights, self.noise_std = normalize_weights, noise_std
        self.num_groups, self.topk_groups, self.scaling = num_groups, topk_groups, scaling
        # Selection-only bias (DeepSeek-V3's e_score_correction_bias): a buffer, not learnt by
        # gradients; checkpointed with the model.
        self.register_buffer("score_bias_E", torch.zeros(num_experts, dtype=torch.float32))
        # Auxiliary-loss-free balancing (balance.py): choices counted in training calls.
        self.bias_update_rate = bias_update_rate
        # int64: exact counts, and left alone by `model.to(torch.bfloat16)`
        self.register_buffer("load_E", torch.zeros(num_experts, dtype=torch.int64),
                             persistent=False)

    @torch.no_grad()
    def update_selection_bias(self, group: dist.ProcessGroup | None = None) -> None:
        """bias += rate * sign(mean load - load), centred; counts summed over `group` first."""
        lanes_for(self.load_E.device).join("stats", self.load_E)  # the counts are added there
        load_E = self.load_E.clone()
        if group is not None or (dist.is_available() and dist.is_initialized()):
            dist.all_reduce(load_E, group=group)
        load_E = load_E.double()
        delta_E = self.bias_update_rate * torch.sign(load_E.mean() - load_E).float()
        self.score_bias_E += delta_E - delta_E.mean()
        self.load_E.zero_()

    def forward(self, x_TM: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TM)
        if self.training and self.noise_std > 0:
            logits_TE = logits_TE + self.noise_std * torch.randn_like(logits_TE)
        scores_TE = torch.sigmoid(logits_TE)
        choice_TE = scores_TE.detach() + self.score_bias_E.float()
        if self.num_groups > 1:
            num_tokens, num_experts = choice_TE.shape  # (no -1: zero tokens must reshape)
            choice_TGe = choice_TE.view(num_tokens, self.num_groups,
                                        num_experts // self.num_groups)
            group_TG = choice_TGe.topk(2, dim=-1).values.sum(dim=-1)
            keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(
                1, group_TG.topk(self.topk_groups, dim=-1).indices, True)
            choice_TE = choice_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")) \
                .view(num_tokens, num_experts)
        expert_TK = torch.topk(choice_TE, self.top_k, dim=-1).indices
        if self.training and self.bias_update_rate > 0 and torch._C._current_graph_task_id() == -1:
            # counted once per training call (not again in a checkpoint's recompute), on the
            # lane every call shares: micro-batches on streams of their own add in turn
            with lanes_for(expert_TK.device).on("stats", expert_TK, self.load_E):
                self.load_E += count_per_expert(expert_TK, self.num_experts)
        weight_TK = scores_TE.gather(1, expert_TK)
        if self.normalize_weights:
            weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weight_TK = weight_TK * self.scaling
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return Routing(probs_TE, expert_TK, weight_TK, z_loss(logits_TE))
