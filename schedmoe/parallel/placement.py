"""Expert placement for a whole model: re-place every MoE layer's experts from the load it
measured (SmartMoE's online choice with DeepSeek's EPLB packing: plan/placement.py), and sum
the replicas' gradients before the optimizer step.

    loss.backward()
    schedmoe.parallel.sync_replica_grads(model)      # with replica slots: every step
    optimizer.step()
    if step % 50 == 0:
        schedmoe.parallel.rebalance(model, optimizer)   # between steps

Both are collectives: every rank calls them at the same point.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..plan.placement import PlanChoice, plan_placement
from .mesh import expert_load, named_moe_layers

# A replicated expert's gradient sum (about twice its weights over the wire) in pairs' compute
# (6 flops a weight): both scale with the expert's size, so the ratio is the machine's. 150
# comes from 2 CPU ranks over gloo: a filled replica slot a rank made a balanced 154 ms step
# 12 ms slower, ~6 ms per replicated expert, ~160 pairs' time (docs/placement.md; the JSON of
# experiments/placement_bench.py as of commit 6a1b4d6). NVLink GPUs have a lower ratio,
# inter-node links a higher one.
REPLICA_PAIRS = 150.0


def sync_replica_grads(model: nn.Module) -> None:
    """Every MoE layer's expert gradients summed over their replicas (layer.sync_replica_grads):
    after the last backward of a step, before clipping and the optimizer step."""
    for _, layer in named_moe_layers(model):
        layer.sync_replica_grads()


def rebalance(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
              node_size: int | None = None, seconds_per_pair: float = 1e-6,
              seconds_per_move: float = 0.0, steps_between: int = 100,
              seconds_per_replica: float | None = None) -> dict[str, PlanChoice]:
    """Plan each called MoE layer's placement from its load over the recent calls (summed over
    every rank, `expert_load`) and move its experts, weights and `optimizer`'s moments, where
    the plan's predicted gain beats the cost of moving (`seconds_per_move` each expert moved,
    amortised over `steps_between` steps). A replicated expert costs `seconds_per_replica` a
    step (its gradient sum), by default REPLICA_PAIRS pairs' time: so replica slots stay empty
    unless a replica takes more than that off the slowest rank. Returns each layer's choice
    (the reason, and every candidate's prediction)."""
    if seconds_per_replica is None:
        seconds_per_replica = REPLICA_PAIRS * seconds_per_pair
    loads = expert_load(model)
    choices = {}
    for name, layer in named_moe_layers(model):
        if name not in loads:
            continue
        choice = plan_placement(np.asarray(loads[name].tokens), layer.group.size,
                                layer.config.redundant_slots, current=layer.placement,
                                node_size=node_size, seconds_per_pair=seconds_per_pair,
                                seconds_per_move=seconds_per_move, steps_between=steps_between,
                                seconds_per_replica=seconds_per_replica)
        if choice.placement != layer.placement:
            layer.place(choice.placement, optimizer)
        choices[name] = choice
    return choices
