"""Capacity and slots: how many (token, choice) pairs each expert takes on this rank, and the
slot of every pair in its expert's buffer.

Legend: T tokens, E experts (global), K top-k.

Every (token, choice) pair gets a slot in its expert's buffer in priority order: by position
(all first choices in token order, then all second choices, ...) or by probability (tokens
sorted by their best gate weight, Tutel's batch-prioritised routing). Pairs whose slot is at or
beyond the capacity limit are dropped (plan/plans.py).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from ..errors import ConfigError

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
    counts_E = count_per_expert(expert_P, num_experts)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_expert_P = expert_P[by_expert_P]
    slot_P = torch.arange(pair_P.numel(), device=expert_TK.device) - start_E[sorted_expert_P]
    slot_KT = torch.empty_like(slot_P).index_copy_(0, pair_P[by_expert_P], slot_P)
    return slot_KT.view(top_k, num_tokens).t().contiguous(), counts_E


def check_drop_policy(policy: str) -> None:
    if policy not in DROP_POLICIES:
        raise ConfigError(f"drop_policy must be one of {DROP_POLICIES}, got {policy!r}")


def layout_hash(expert_TK: torch.Tensor, slot_TK: torch.Tensor, limit: int) -> int:
    """A hash of which slot each (token, choice) takes: equal layouts put the same token in the
    same slot. Copies the routing to the host (a sync on GPUs); only error feedback needs it."""
    raw = torch.stack([expert_TK, slot_TK]).to("cpu", torch.int64).numpy()
    return zlib.crc32(np.ascontiguousarray(raw).tobytes(), limit & 0xFFFFFFFF) & 0x7FFFFFFF


def count_per_expert(expert_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many of `expert_N` name each expert: `bincount` with a size known beforehand, so no
    host sync on GPUs (bincount reads the largest value first)."""
    return torch.zeros(num_experts, dtype=torch.int64, device=expert_N.device).scatter_add_(
        0, expert_N.reshape(-1), torch.ones_like(expert_N.reshape(-1)))
