"""Which global experts a rank's state dict holds, so that one rank's file can never load
silently into another rank's experts.

An EP rank's `MoELayer.state_dict()` holds only its own experts, under the same keys on every
rank. Each layer adds `<prefix>expert_range` = [first expert, experts held, num_experts] to its
state dict, and on load checks it: a state dict that holds this rank's experts (its own, or
every expert, as `schedmoe.parallel.full_state_dict` gathers them) loads, the right rows sliced
out; any other raises CheckpointError. A state dict without the entry (transformers, older
files) loads as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import CheckpointError

KEY = "expert_range"


def _refuse_replicas(layer: nn.Module, prefix: str) -> None:
    if getattr(layer, "placed", False):
        raise CheckpointError(
            f"{prefix.rstrip('.') or 'the layer'}: a layer with replica slots or a planned "
            "placement has no state dict yet (its slots are not in logical-expert form); "
            "place it back with layer.place(static_placement(E, W)) and redundant_slots=0 "
            "to save or load (issue 27)")


def save_expert_range(layer: nn.Module, state_dict: dict, prefix: str, _metadata) -> None:
    """`state_dict` post-hook of MoELayer."""
    _refuse_replicas(layer, prefix)
    state_dict[prefix + KEY] = torch.tensor(
        [layer.expert_offset, layer.num_local_experts, layer.config.num_experts])


def load_expert_range(layer: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    """`load_state_dict` pre-hook of MoELayer: check the saved range, slice a wider one."""
    _refuse_replicas(layer, prefix)
    saved = state_dict.pop(prefix + KEY, None)
    if saved is None:
        return
    first, count, total = (int(v) for v in saved.tolist())
    mine, held = layer.expert_offset, layer.num_local_experts
    where = prefix.rstrip(".") or "the layer"
    if total != layer.config.num_experts:
        raise CheckpointError(
            f"{where}: the state dict is of a layer with {total} experts, this one has "
            f"{layer.config.num_experts}; num_experts must match the checkpoint")
    if not first <= mine <= mine + held <= first + count:
        raise CheckpointError(
            f"{where}: the state dict holds experts [{first}, {first + count}) of {total} (one "
            f"rank's share), this rank needs [{mine}, {mine + held}). Save every expert with "
            "schedmoe.parallel.full_state_dict(model), or use schedmoe.parallel.save_checkpoint"
            " / load_checkpoint, which reshard")
    if count == held:
        return
    for key in [k for k in state_dict if k.startswith(prefix + "experts.")]:
        value = state_dict[key]
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == count:
            state_dict[key] = value[mine - first:mine - first + held]
