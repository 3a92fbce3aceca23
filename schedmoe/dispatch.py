"""Capacity, token dropping, and the encode/decode between tokens and expert buffers.

Legend: T tokens, M model dim, E experts (global), C capacity (slots per expert), K top-k.

Every (token, choice) pair gets a slot in its expert's buffer in priority order: by position
(all first choices in token order, then all second choices, ...) or by probability (tokens
sorted by their best gate weight, Tutel's batch-prioritised routing). Pairs whose slot is at or
beyond the capacity limit are dropped: they contribute nothing to the output and are counted.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError

DROP_POLICIES = ("position", "probability")


def capacity_limit(capacity_factor: float, top_k: int, num_tokens: int, num_experts: int,
                   needed: int) -> int:
    """Slots per expert on this rank (Tutel's semantics).

    > 0: fixed, ceil(cf * k * T / E); pad and drop.
    0: dropless, as many as the busiest expert needs.
    < 0: dropless, but at most ceil(|cf| * k * T / E).
    Never more than T: a router picks k distinct experts per token, so no expert receives more
    than T pairs and slots beyond T would only be padding (a huge factor cannot allocate more).
    """
    slots = abs(capacity_factor) * top_k * num_tokens / num_experts
    fixed = num_tokens if slots >= num_tokens else math.ceil(slots)
    if capacity_factor > 0:
        return fixed
    if capacity_factor == 0:
        return needed
    return min(needed, fixed)


def locate(expert_TK: torch.Tensor, num_experts: int,
           priority_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot of every (token, choice) in its expert's buffer, and tokens per expert.

    Choice k of every token comes before choice k+1 of any token; within a choice, tokens go in
    `priority_T` order (descending) if given, else in position order. One stable sort of the
    T*K pairs by expert: O(T*K + E) memory (no [K, T, E] one-hot).
    """
    num_tokens, top_k = expert_TK.shape
    order_T = torch.arange(num_tokens, device=expert_TK.device)
    if priority_T is not None:
        order_T = torch.argsort(priority_T, descending=True, stable=True)
    # Pairs in priority order: choice-major, then tokens in `order_T`; flat index k * T + t.
    pair_P = (torch.arange(top_k, device=expert_TK.device).unsqueeze(1) * num_tokens
              + order_T.unsqueeze(0)).reshape(-1)
    expert_P = expert_TK.t().reshape(-1)[pair_P]
    by_expert_P = torch.argsort(expert_P, stable=True)
    counts_E = torch.bincount(expert_P, minlength=num_experts)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_expert_P = expert_P[by_expert_P]
    slot_P = torch.arange(pair_P.numel(), device=expert_TK.device) - start_E[sorted_expert_P]
    slot_KT = torch.empty_like(slot_P).index_copy_(0, pair_P[by_expert_P], slot_P)
    return slot_KT.view(top_k, num_tokens).t().contiguous(), counts_E


@dataclass
class DispatchPlan:
    """Where each kept (token, choice) goes in the `[E, C, M]` buffer, and what was dropped."""

    num_experts: int
    capacity: int  # C of the buffer: the largest limit over the group (0 if ragged)
    kept_TK: torch.Tensor  # bool: did (token, choice) get a slot
    token_N: torch.Tensor  # token index of each kept pair (N kept pairs)
    slot_N: torch.Tensor  # flat index expert * C + slot of each kept pair (ragged: its row)
    weight_N: torch.Tensor  # combine weight of each kept pair (differentiable)
    counts_E: torch.Tensor  # pairs routed to each expert, before dropping
    dropped_E: torch.Tensor  # pairs dropped at each expert
    ragged: bool = False  # rows [N, M] in pair order instead of a padded [E, C, M] buffer

    @property
    def kept(self) -> int:
        return int(self.token_N.numel())

    @property
    def dropped(self) -> int:
        return int(self.dropped_E.sum())


def make_plan(expert_TK: torch.Tensor, weight_TK: torch.Tensor, slot_TK: torch.Tensor,
              counts_E: torch.Tensor, limit: int, capacity: int) -> DispatchPlan:
    """Keep the pairs whose slot is below this rank's `limit`; lay them out in C = `capacity`."""
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


def make_ragged_plan(expert_TK: torch.Tensor, weight_TK: torch.Tensor, slot_TK: torch.Tensor,
                     counts_E: torch.Tensor, limit: int) -> DispatchPlan:
    """Dropless without padding: the kept pairs ordered by (expert, slot), that is by
    destination rank, then expert, then priority; row n of the `[N, M]` buffer is pair n."""
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
                        weight_TK.reshape(-1)[pairs_N], counts_E, dropped_E, ragged=True)


def encode(x_TM: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Scatter the kept tokens into a zero-padded `[E, C, M]` buffer (ragged: gather them into
    `[N, M]` rows in the plan's order)."""
    if plan.ragged:
        return x_TM.index_select(0, plan.token_N)
    model_dim = x_TM.shape[-1]
    buf = x_TM.new_zeros(plan.num_experts * plan.capacity, model_dim)
    buf.index_copy_(0, plan.slot_N, x_TM.index_select(0, plan.token_N))  # fresh: in place
    return buf.view(plan.num_experts, plan.capacity, model_dim)


def decode(y_ECM: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """Sum each token's expert outputs weighted by its gate; dropped pairs add nothing."""
    model_dim = y_ECM.shape[-1]
    y_NM = y_ECM if plan.ragged else y_ECM.reshape(-1, model_dim).index_select(0, plan.slot_N)
    y_NM = y_NM * plan.weight_N.unsqueeze(1).to(y_NM.dtype)
    return y_NM.new_zeros(num_tokens, model_dim).index_add(0, plan.token_N, y_NM)


def layout_hash(expert_TK: torch.Tensor, slot_TK: torch.Tensor, limit: int) -> int:
    """A hash of which slot each (token, choice) takes: equal layouts put the same token in the
    same slot. Copies the routing to the host (a sync on GPUs); only error feedback needs it."""
    raw = torch.stack([expert_TK, slot_TK]).to("cpu", torch.int64).numpy()
    return zlib.crc32(np.ascontiguousarray(raw).tobytes(), limit & 0xFFFFFFFF) & 0x7FFFFFFF


def check_drop_policy(policy: str) -> None:
    if policy not in DROP_POLICIES:
        raise ConfigError(f"drop_policy must be one of {DROP_POLICIES}, got {policy!r}")
