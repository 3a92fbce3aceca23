"""Expert weights in physical slots: every rank's S slots hold logical experts (a placement,
plan/placement.py), an expert held by several slots (replicas) in identical copies.

Legend: E logical experts, W ranks of the EP group, n = E / W, S physical slots a rank; every
expert parameter is `[S, ...]` (one row per slot); `slots[w][s]` is the logical expert in slot s
of rank w, or EMPTY (a slot holding no expert: its rows are zeros and no pair goes there). A
rank's "logical rows" are experts [w n, (w + 1) n) in order: the static layout, which is the
form checkpoints and plain state dicts keep (global expert identity).

- `to_slots`: this rank's slots from every rank's logical rows (one all-gather).
- `to_logical`: this rank's logical rows from every rank's slots (one all-gather), each expert
  read from its first holder.
- `fill_slots` / `move_slots`: the parameters (and on a move, any optimizer state shaped like
  them: AdamW's moments) set from the logical rows / carried to another placement.
- `sum_replica_grads`: each slot's gradient becomes its logical expert's, summed over the
  replicas (one all-reduce per parameter), so replicas take identical optimizer steps and the
  training equals the unreplicated model's.
- `first_copies`: which of this rank's slots are their expert's first holder (count each
  expert once: gradient norms).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ...comm.groups import EPGroup, collective, collective_device

Slots = tuple[tuple[int, ...], ...]
EMPTY = -1  # the same mark as plan/placement.py's


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
            if e != EMPTY and first[e] < 0:
                first[e] = w * len(row) + s
    return torch.tensor(first)


def _every_expert(t: torch.Tensor, slots: Slots, num_experts: int, group: EPGroup,
                  what: str) -> torch.Tensor:
    """[E, ...]: every logical expert's row of the slot tensor `t` [S, ...], from its first
    holder (a collective)."""
    every = _all_gather(t, group, what)
    return every[_first_holders(slots, num_experts).to(every.device)]


@torch.no_grad()
def to_logical(t: torch.Tensor, slots: Slots, num_experts: int,
               group: EPGroup) -> torch.Tensor:
    """This rank's logical rows [n, ...] of the slot tensor `t` [S, ...] (a collective)."""
    n = num_experts // group.size
    every = _every_expert(t, slots, num_experts, group, "the experts' logical form")
    return every[group.rank * n:(group.rank + 1) * n].clone()


@torch.no_grad()
def to_slots(rows: torch.Tensor, slots: Slots, group: EPGroup) -> torch.Tensor:
    """This rank's slots [S, ...] from each rank's logical rows `rows` [n, ...] (a
    collective)."""
    every = _all_gather(rows, group, "the replica slots' fill")  # [E, ...] in expert order
    return take_rows(every, slots[group.rank])


def take_rows(every: torch.Tensor, row: tuple[int, ...] | list[int]) -> torch.Tensor:
    """The rows `row` of `every` (for a rank's slots: expert ids into [E, ...]), zeros where
    `row` is EMPTY."""
    index = torch.tensor([max(e, 0) for e in row], device=every.device)
    out = every[index]
    empty = [s for s, e in enumerate(row) if e == EMPTY]
    if empty:
        out[torch.tensor(empty, device=out.device)] = 0
    return out


@torch.no_grad()
def fill_slots(experts: nn.Module, own: nn.Module, slots: Slots, group: EPGroup) -> None:
    """Set every slot of `experts` from `own`, whose rows are this rank's logical rows."""
    sources = dict(own.named_parameters())
    for name, param in experts.named_parameters():
        param.copy_(to_slots(sources[name], slots, group).to(param.dtype))


@torch.no_grad()
def move_slots(experts: nn.Module, old: Slots, new: Slots, num_experts: int, group: EPGroup,
               optimizer: torch.optim.Optimizer | None = None) -> None:
    """Re-place: every parameter, and each optimizer state tensor shaped like it, gathered
    from every rank, its logical experts taken from their first holder under `old`, and this
    rank's slots under `new` filled from them."""
    for param in experts.parameters():
        tensors = [param]
        if optimizer is not None:
            state = optimizer.state.get(param, {})
            tensors += [v for v in state.values()
                        if isinstance(v, torch.Tensor) and v.shape == param.shape]
        for t in tensors:
            every = _every_expert(t, old, num_experts, group, "the experts' re-placement")
            t.copy_(take_rows(every, new[group.rank]))


def first_copies(slots: Slots, rank: int) -> list[int]:
    """This rank's slots that hold the first copy of their expert (rank order, then slot)."""
    seen = {e for row in slots[:rank] for e in row} | {EMPTY}
    return [s for s, e in enumerate(slots[rank]) if e not in seen]


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
