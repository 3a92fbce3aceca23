"""Which global experts a rank's state dict holds, so that one rank's file can never load
silently into another rank's experts.

An EP rank's `MoELayer.state_dict()` holds only its own expert rows, under the same keys on
every rank. Each layer records which logical experts those rows are:
- `<prefix>expert_range` = [first expert, experts held, num_experts] for the static layout
  (rank w holds experts [w E / W, (w + 1) E / W));
- `<prefix>expert_slots` = [num_experts, expert of row 0, expert of row 1, ...] for a placed
  layer (replica slots or a planned placement, plan/placement.py), whose rows are its slots
  (-1: an empty slot, loaded as zeros).

On load it checks them: a state dict holding every expert this rank's rows need (its own, every
expert as `schedmoe.parallel.full_state_dict` gathers them, or another placement's slots that
happen to cover them) loads, each row taken from the saved row of its expert; any other raises
CheckpointError. A state dict without either entry (transformers, older files) loads as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import CheckpointError
from .replicas import EMPTY, take_rows

KEY = "expert_range"
SLOTS_KEY = "expert_slots"
KEYS = (KEY, SLOTS_KEY)


def _rows(layer: nn.Module) -> list[int]:
    """The logical expert of each of the layer's expert rows."""
    return list(layer.placement.slots[layer.group.rank])


def save_expert_range(layer: nn.Module, state_dict: dict, prefix: str, _metadata) -> None:
    """`state_dict` post-hook of MoELayer."""
    total = layer.config.num_experts
    if layer.placed:
        state_dict[prefix + SLOTS_KEY] = torch.tensor([total, *_rows(layer)])
    else:
        state_dict[prefix + KEY] = torch.tensor(
            [layer.expert_offset, layer.num_local_experts, total])


def load_expert_range(layer: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    """`load_state_dict` pre-hook of MoELayer: check the saved rows' experts, and take each of
    this layer's rows from the saved row of its expert."""
    by_range = state_dict.pop(prefix + KEY, None)
    by_slots = state_dict.pop(prefix + SLOTS_KEY, None)
    if by_slots is not None:
        total, *held = (int(v) for v in by_slots.tolist())
        what = f"slots holding experts {held}"
    elif by_range is not None:
        first, count, total = (int(v) for v in by_range.tolist())
        held = list(range(first, first + count))
        what = f"experts [{first}, {first + count}) of {total}"
    else:
        return
    where = prefix.rstrip(".") or "the layer"
    if total != layer.config.num_experts:
        raise CheckpointError(
            f"{where}: the state dict is of a layer with {total} experts, this one has "
            f"{layer.config.num_experts}; num_experts must match the checkpoint")
    need = _rows(layer)
    if held == need:
        return
    missing = sorted(set(need) - set(held) - {EMPTY})
    if missing:
        raise CheckpointError(
            f"{where}: the state dict holds {what} (one rank's share), this rank needs experts "
            f"{need}, and {missing} are not there. Save every expert with "
            "schedmoe.parallel.full_state_dict(model), or use schedmoe.parallel.save_checkpoint"
            " / load_checkpoint, which reshard")
    rows = [held.index(e) if e != EMPTY else EMPTY for e in need]  # an empty slot: zeros
    for key in [k for k in state_dict if k.startswith(prefix + "experts.")]:
        value = state_dict[key]
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == len(held):
            state_dict[key] = take_rows(value, rows)
