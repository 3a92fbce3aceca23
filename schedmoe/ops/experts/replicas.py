"""Expert weights in physical slots: every rank's S slots hold logical experts (a placement,
plan/placement.py), an expert held by several slots (replicas) in identical copies.

Legend: E logical experts, W ranks of the EP group, S physical slots a rank; every expert
parameter is `[S, ...]` (one row per slot); `slots[w][s]` is the logical expert in slot s of
rank w.

- `fill_slots`: the slots from each rank's own logical experts (the static E / W a rank).
- `move_slots`: to another placement, the parameters and any optimizer state shaped like them
  (AdamW's moments), in one all-gather per tensor.
- `sum_replica_grads`: each slot's gradient becomes its logical expert's, summed over the
  replicas (one all-reduce per parameter), so replicas take identical optimizer steps and the
  training equals the unreplicated model's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ...comm.groups import EPGroup, collective, collective_device

Slots = tuple[tuple[int, ...], ...]


def _all_gather(t: torch.Tensor, group: EPGroup, what: str) -> torch.Tensor:
    """Every rank's `t` stacked along dim 0, by rank (on the group's collective device)."""
    if not group.distributed:
        return t.detach().clone()
    device = collective_device(group.pg) if t.device.type == "cpu" else t.device
    local = t.detach().to(device).contiguous()
    out = local.new_empty((group.size * local.shape[0], *local.shape[1:]))
    with collective(what, group):
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, local, group=group.pg)  # (all_gather_single from torch 2.13 on)
    return out.to(t.device)


def _first_holders(slots: Slots, num_experts: int) -> torch.Tensor:
    """For each logical expert, its first physical slot's global index (w * S + s)."""
    first = [-1] * num_experts
    for w, row in enumerate(slots):
        for s, e in enumerate(row):
            if first[e] < 0:
                first[e] = w * len(row) + s
    return torch.tensor(first)


@torch.no_grad()
def fill_slots(experts: nn.Module, own: nn.Module, slots: Slots, group: EPGroup) -> None:
    """Set every slot of `experts` from `own`, whose rows are this rank's E / W logical experts
    in order (rank w: experts [w E / W, (w + 1) E / W))."""
    mine = torch.tensor(slots[group.rank])
    sources = dict(own.named_parameters())
    for name, param in experts.named_parameters():
        logical = _all_gather(sources[name], group, "the replica slots' first fill")
        param.copy_(logical[mine.to(logical.device)].to(param.dtype))


@torch.no_grad()
def move_slots(experts: nn.Module, old: Slots, new: Slots, num_experts: int, group: EPGroup,
               optimizer: torch.optim.Optimizer | None = None) -> None:
    """Re-place: every parameter, and each optimizer state tensor shaped like it, gathered
    from every rank, its logical experts taken from their first holder under `old`, and this
    rank's slots under `new` filled from them."""
    first = _first_holders(old, num_experts)
    mine = torch.tensor(new[group.rank])
    for param in experts.parameters():
        tensors = [param]
        if optimizer is not None:
            state = optimizer.state.get(param, {})
            tensors += [v for v in state.values()
                        if isinstance(v, torch.Tensor) and v.shape == param.shape]
        for t in tensors:
            logical = _all_gather(t, group, "the experts' re-placement")[first.to(t.device)]
            t.copy_(logical[mine.to(t.device)])


@torch.no_grad()
def sum_replica_grads(experts: nn.Module, slots: Slots, num_experts: int,
                      group: EPGroup) -> None:
    """Each replica's gradient := the sum over every replica of its logical expert (one
    all-reduce per parameter, of the replicated experts' rows only; a slot whose expert has no
    other replica already holds its whole gradient)."""
    held = [sum(e in row for row in slots) for e in range(num_experts)]
    shared = [e for e in range(num_experts) if held[e] > 1]
    if not shared:
        return
    row_of = {e: i for i, e in enumerate(shared)}
    mine = [(s, row_of[e]) for s, e in enumerate(slots[group.rank]) if e in row_of]
    for param in experts.parameters():
        if param.grad is None:
            continue
        grad = param.grad
        local = torch.tensor([s for s, _ in mine], dtype=torch.long, device=grad.device)
        rows = torch.tensor([r for _, r in mine], dtype=torch.long, device=grad.device)
        total = grad.new_zeros((len(shared), *grad.shape[1:]))
        total.index_add_(0, rows, grad.index_select(0, local))
        if group.distributed:
            device = collective_device(group.pg) if grad.device.type == "cpu" else grad.device
            total = total.to(device)
            with collective("the replicas' gradient sum", group):
                dist.all_reduce(total, group=group.pg)
            total = total.to(grad.device)
        grad.index_copy_(0, local, total.index_select(0, rows))
