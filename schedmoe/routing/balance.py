"""Load balancing: the auxiliary balance losses, and auxiliary-loss-free balancing.

Legend: T tokens, E experts (global), K top-k, B sequences of S tokens.

Losses (`MoELayer(balance_loss=...)`), all E * sum_e P_e * f_e with P_e the mean router
probability of expert e and f_e the fraction of routed choices that went to e:
- "gshard": f over the top-1 choices of this rank's tokens (GShard, Tutel).
- "topk": f over all k choices (Switch's form generalised to k; equal to gshard for k = 1).
- "sequence": the topk form per sequence (the input's [B, S, M] rows), averaged over sequences
  (DeepSeek-V3's sequence-wise loss).
- "global": the topk form with the choice counts summed over the layer's `balance_group`
  (default the EP group; Megatron's global-batch loss): every rank's router is pushed towards
  the group's balance, not its own. Over the whole data-parallel world, the mean of the ranks'
  losses is the loss of the global batch, whatever the layout. Costs an all-reduce of E counts
  per call.
Every form is 1.0 when the routing is perfectly balanced.

Auxiliary-loss-free balancing (DeepSeek-V3): a router with a selection-only bias
(`sigmoid_grouped`, `bias_update_rate` > 0) counts the choices of its training calls;
`update_balancing_biases(model)` (call it once per optimiser step, after backward, on every
rank) sums the counts over the ranks that replicate the router, moves each bias by
rate * sign(mean load - load) (centred, so the biases do not drift together) and resets the
counts. Between updates the routing of a step, its activation-checkpoint recomputes
included, sees one fixed bias.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from .capacity import count_per_expert

BALANCE_LOSSES = ("gshard", "topk", "sequence", "global")


def balance_loss(kind: str, probs_TE: torch.Tensor, expert_TK: torch.Tensor,
                 sequences: int = 1, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The balance loss of `kind` (see the module docstring); 0 (in the graph) without tokens."""
    num_tokens, num_experts = probs_TE.shape
    if kind not in BALANCE_LOSSES:
        raise ConfigError(f"balance_loss must be one of {BALANCE_LOSSES}, got {kind!r}")
    if kind == "sequence" and sequences > 1 and num_tokens:
        per_seq = [balance_loss("topk", p, e) for p, e in
                   zip(probs_TE.chunk(sequences), expert_TK.chunk(sequences))]
        return torch.stack(per_seq).mean()
    choices = expert_TK[:, :1] if kind == "gshard" else expert_TK
    counts_E = count_per_expert(choices, num_experts).float()
    total = counts_E.new_full((), choices.numel())
    if kind == "global" and group is not None:
        both = torch.cat([counts_E, total.view(1)])
        dist.all_reduce(both, group=group)
        counts_E, total = both[:-1], both[-1]
    if num_tokens == 0:  # (then the other ranks' tokens do not count here either)
        return probs_TE.sum()
    return num_experts * torch.sum(probs_TE.mean(dim=0) * counts_E / total)


@torch.no_grad()
def update_balancing_biases(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Apply the auxiliary-loss-free update to every router of `model` that keeps one; returns
    how many were updated. `group`: the ranks that replicate the routers (default WORLD when
    torch.distributed is initialised); every rank of it must call this."""
    updated = 0
    for module in model.modules():
        step = getattr(module, "update_selection_bias", None)
        if callable(step) and getattr(module, "bias_update_rate", 0.0) > 0:
            step(group)
            updated += 1
    return updated
