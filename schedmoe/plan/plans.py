"""Token plans: which (token, choice) pairs are kept, where each goes, and the encode/decode
between tokens and the rows the experts see.

Legend: T tokens, M model dim, E experts (global), C capacity (slots per expert), K top-k,
N pairs a plan lists.

A pair whose slot (routing/capacity.py) is below this rank's capacity limit is kept; the others
are dropped: they contribute nothing to the output and are counted. Kept pairs go to a padded
`[E, C, M]` buffer (`padded_plan`) or to `[N, M]` rows in (expert, slot) order (`rows_plan`).
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
    token_N: torch.Tensor  # token of each pair listed (rows: the N kept; padded: all T * K)
    slot_N: torch.Tensor  # padded: flat index expert * C + slot (E * C if dropped); rows: n
    weight_N: torch.Tensor  # combine weight of each pair listed (differentiable; 0 if dropped)
    counts_E: torch.Tensor  # pairs routed to each expert, before dropping
    dropped_E: torch.Tensor  # pairs dropped at each expert


def padded_plan(expert_TK: torch.Tensor, weight_TK: torch.Tensor, slot_TK: torch.Tensor,
                counts_E: torch.Tensor, limit: int, capacity: int) -> DispatchPlan:
    """Keep the pairs whose slot is below this rank's `limit`; lay them out in C = `capacity`
    slots per expert. Static shapes (no host sync): the plan lists all T * K pairs, a dropped
    pair pointing at slot E * C (one row past the buffer, `scatter` discards it) with weight 0."""
    if limit > capacity:
        raise ConfigError(f"capacity limit {limit} exceeds the buffer capacity {capacity}")
    num_experts = counts_E.numel()
    num_tokens, top_k = expert_TK.shape
    kept_TK = slot_TK < limit
    trash = num_experts * capacity
    slot_N = torch.where(kept_TK, expert_TK * capacity + slot_TK, trash).reshape(-1)
    weight_N = torch.where(kept_TK, weight_TK, torch.zeros_like(weight_TK)).reshape(-1)
    token_N = torch.arange(num_tokens, device=expert_TK.device).repeat_interleave(
        top_k, output_size=num_tokens * top_k)
    dropped_E = torch.zeros_like(counts_E).scatter_add_(
        0, expert_TK.reshape(-1), (~kept_TK).reshape(-1).to(counts_E.dtype))
    return DispatchPlan(num_experts, capacity, kept_TK, token_N, slot_N, weight_N, counts_E,
                        dropped_E)


def rows_plan(expert_TK: torch.Tensor, weight_TK: torch.Tensor, slot_TK: torch.Tensor,
              counts_E: torch.Tensor, limit: int, num_rows: int) -> DispatchPlan:
    """Without padding: the kept pairs ordered by (expert, slot), that is by destination rank,
    then expert, then priority; row n of the `[N, M]` rows is pair n. `num_rows`: N, known on
    the host from the split sizes (so no shape here depends on reading the device)."""
    num_experts = counts_E.numel()
    kept_TK = slot_TK < limit
    kept_E = counts_E.clamp(max=limit)
    # Slots are dense within an expert, so a kept pair's row is its expert's first row plus its
    # slot: the order comes from `locate`'s sort, not from a second one. A dropped pair goes to
    # row N (one past the end, cut off).
    expert_P, kept_P = expert_TK.reshape(-1), kept_TK.reshape(-1)
    row_P = torch.where(kept_P, (torch.cumsum(kept_E, 0) - kept_E)[expert_P]
                        + slot_TK.reshape(-1), num_rows)
    pairs = torch.arange(expert_P.numel(), device=expert_P.device)
    pairs_N = pairs.new_zeros(num_rows + 1).index_copy_(0, row_P, pairs)[:num_rows]
    top_k = expert_TK.shape[1]
    return DispatchPlan(num_experts, 0, kept_TK, pairs_N // top_k,
                        torch.arange(num_rows, device=pairs_N.device),
                        weight_TK.reshape(-1)[pairs_N], counts_E, counts_E - kept_E)


def scatter(x_TM: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """The kept tokens in a zero-padded `[E, C, M]` buffer (dropped pairs land in one extra
    row, cut off)."""
    model_dim = x_TM.shape[-1]
    slots = plan.num_experts * plan.capacity
    buf = x_TM.new_zeros(slots + 1, model_dim)
    buf.index_copy_(0, plan.slot_N, x_TM.index_select(0, plan.token_N))  # fresh: in place
    return buf[:slots].view(plan.num_experts, plan.capacity, model_dim)


def gather(x_TM: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """The kept tokens as `[N, M]` rows in the plan's order."""
    return x_TM.index_select(0, plan.token_N)


def combine(y_NM: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """Sum each token's expert outputs (`y_NM`: one row per kept pair) weighted by its gate;
    dropped pairs add nothing."""
    y_NM = y_NM * plan.weight_N.unsqueeze(1).to(y_NM.dtype)
    return y_NM.new_zeros(num_tokens, y_NM.shape[-1]).index_add(0, plan.token_N, y_NM)
