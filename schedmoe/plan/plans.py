"""Token plans: which (token, choice) pairs are kept, where each goes, and the encode/decode
between tokens and the rows the experts see.

Legend: T tokens, M model dim, E experts (global), C capacity (slots per expert), K top-k,
N kept pairs.

A pair whose slot (routing/capacity.py) is below this rank's capacity limit is kept; the others
are dropped: they contribute nothing to the output and are counted. Kept pairs go to a padded
`[E, C, M]` buffer (`make_plan`) or to `[N, M]` rows in (expert, slot) order (`make_ragged_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

@dataclass
class DispatchPlan:
    """Where each kept (token, choice) pair goes, and what was dropped."""

    num_experts: int
    capacity: int  # C of a padded buffer (the largest limit over the group); 0 for rows
    kept_TK: torch.Tensor  # bool: did (token, choice) get a slot
    token_N: torch.Tensor  # token index of each kept pair (N kept pairs)
    slot_N: torch.Tensor  # padded: flat index expert * C + slot of each kept pair; rows: n
    weight_N: torch.Tensor  # combine weight of each kept pair (differentiable)
    counts_E: torch.Tensor  # pairs routed to each expert, before dropping
    dropped_E: torch.Tensor  # pairs dropped at each expert

    @property
    def kept(self) -> int:
        return int(self.token_N.numel())

    @property
    def dropped(self) -> int:
        return int(self.dropped_E.sum())


def padded_plan(expert_TK: torch.Tensor, weight_TK: torch.Tensor, slot_TK: torch.Tensor,
                counts_E: torch.Tensor, limit: int, capacity: int) -> DispatchPlan:
    """Keep the pairs whose slot is below this rank's `limit`; lay them out in C = `capacity`
    slots per expert."""
    if limit > capacity:
        raise ConfigError(f"capacity limit {limit} exceeds the buffer capacity {capacity}")
    num_experts = counts_E.numel()
    kept_TK = slot_TK < limit
    token_N = kept_TK.nonzero()[:, 0]
    expert_N = expert_TK[kept_TK]
    dropped_E = counts_E - torch.bincount(expert_N, minlength=num_experts)
    return DispatchPlan(num_experts, capacity, kept_TK, token_N,
                        expert_N * capacity + slot_TK[kept_TK], weight_TK[kept_TK], counts_E,
                        dropped_E)


def rows_plan(expert_TK: torch.Tensor, weight_TK: torch.Tensor, slot_TK: torch.Tensor,
              counts_E: torch.Tensor, limit: int) -> DispatchPlan:
    """Without padding: the kept pairs ordered by (expert, slot), that is by destination rank,
    then expert, then priority; row n of the `[N, M]` rows is pair n."""
    num_experts = counts_E.numel()
    kept_TK = slot_TK < limit
    # Slots are dense within an expert, so a kept pair's row is its expert's first row plus its
    # slot: the order comes from `locate`'s sort, not from a second one.
    pairs = kept_TK.reshape(-1).nonzero()[:, 0]
    expert_kept = expert_TK.reshape(-1)[pairs]
    kept_E = torch.bincount(expert_kept, minlength=num_experts)
    row = (torch.cumsum(kept_E, 0) - kept_E)[expert_kept] + slot_TK.reshape(-1)[pairs]
    pairs_N = torch.empty_like(pairs).index_copy_(0, row, pairs)
    top_k = expert_TK.shape[1]
    dropped_E = counts_E - kept_E
    return DispatchPlan(num_experts, 0, kept_TK, pairs_N // top_k,
                        torch.arange(pairs_N.numel(), device=pairs_N.device),
                        weight_TK.reshape(-1)[pairs_N], counts_E, dropped_E)


def scatter(x_TM: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """The kept tokens in a zero-padded `[E, C, M]` buffer."""
    model_dim = x_TM.shape[-1]
    buf = x_TM.new_zeros(plan.num_experts * plan.capacity, model_dim)
    buf.index_copy_(0, plan.slot_N, x_TM.index_select(0, plan.token_N))  # fresh: in place
    return buf.view(plan.num_experts, plan.capacity, model_dim)


def gather(x_TM: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """The kept tokens as `[N, M]` rows in the plan's order."""
    return x_TM.index_select(0, plan.token_N)


def combine(y_NM: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """Sum each token's expert outputs (`y_NM`: one row per kept pair) weighted by its gate;
    dropped pairs add nothing."""
    y_NM = y_NM * plan.weight_N.unsqueeze(1).to(y_NM.dtype)
    return y_NM.new_zeros(num_tokens, y_NM.shape[-1]).index_add(0, plan.token_N, y_NM)
