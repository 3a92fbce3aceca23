"""One rank's routing of a call: the router's choices, every pair's slot, the capacity limit,
and what the agreement needs from them.

Legend: T tokens, M model dim, E experts (global), K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comm.host import HostCopy
from .base import Router, Routing
from .capacity import capacity_limit, layout_hash, locate


@dataclass
class Routed:
    """This rank's routing of one call."""

    routing: Routing
    slot_TK: torch.Tensor  # each pair's slot in its expert's buffer (routing/capacity.py)
    counts_E: torch.Tensor  # pairs routed to each expert, before dropping
    limit: int  # this rank's capacity limit
    counts: list[int] | None = None  # ragged rows: kept pairs per expert (split sizes)
    layout: int = 0  # hash of the token -> slot layout (only when error feedback needs it)
    # With replica slots (plan/placement.py): the pairs' physical experts; `slot_TK`,
    # `counts_E` and `counts` are then physical, and `logical_counts_E` the router's.
    expert_TK: torch.Tensor | None = None
    logical_counts_E: torch.Tensor | None = None


def route(gate: Router, x_TM: torch.Tensor, *, num_experts: int, top_k: int,
          capacity_factor: float, drop_policy: str, ragged: bool, feedback: bool) -> Routed:
    """Route `x_TM` in fp32 (autocast off: every rank and precision picks alike), give every
    pair its slot in priority order and this rank's capacity limit. `ragged`: also the split
    sizes of the exchange; `feedback`: also the slot layout's hash (error feedback)."""
    with torch.autocast(x_TM.device.type, enabled=False):
        routing = gate(x_TM)
    priority_T = routing.weight_TK[:, 0].detach() if drop_policy == "probability" else None
    slot_TK, counts_E = locate(routing.expert_TK, num_experts, priority_T)
    num_tokens = x_TM.shape[0]
    counts = None
    if ragged or capacity_factor <= 0:
        # The one device-to-host copy of a call whose shapes depend on the routing (ragged
        # rows, dropless capacity): pairs per expert, started at once, waited for here.
        counts = HostCopy(counts_E).value().tolist()
    needed = max(counts) if counts and capacity_factor <= 0 else 0
    limit = capacity_limit(capacity_factor, top_k, num_tokens, num_experts, needed)
    routed = Routed(routing, slot_TK, counts_E, limit)
    if feedback:
        routed.layout = layout_hash(routing.expert_TK, slot_TK, limit)
    if ragged:  # the ragged exchange's split sizes
        routed.counts = [min(count, limit) for count in counts]
    return routed
