"""Which tensors of a model are experts, and which experts: the one identity map of expert state.

Legend: E experts (global), E/EP per EP rank.

Every user of that knowledge goes through `ExpertMap(model)`: DCP checkpoints, `full_state_dict`,
`hf.to_hf_state_dict`, gradient clipping, the DDP / FSDP2 / GradSync recipes and
`schedmoe.expert_parameters`. It is keyed by the tensor objects themselves (each MoELayer's
`experts` parameters and buffers, as they are when it is asked: FSDP2 replaces them), never by
module-name strings, and names them by their canonical FQN: the name with the segments of
wrapper modules left out (DDP's and DataParallel's `module`, torch.compile's `_orig_mod`,
activation checkpointing's `_checkpoint_wrapped_module`, FSDP1's `_fsdp_wrapped_module`), which
is the name that `torch.distributed.checkpoint.state_dict` and the bare model use.

Plain state dicts carry each layer's expert range (ops/experts/ranges.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..layer import MoELayer
from ..ops.experts.replicas import first_copies, to_logical, to_slots


# Wrapper modules that add a name segment their state dicts leave out: (module that defines the
# class, class name, attribute holding the wrapped module). Looked up only once the defining
# module is imported (no instance can exist before), so nothing heavy is imported here.
_FSDP1 = ("torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel")
_WRAPPERS = (
    ("torch.nn.parallel.distributed", "DistributedDataParallel", "module"),
    ("torch.nn.parallel.data_parallel", "DataParallel", "module"),
    ("torch._dynamo.eval_frame", "OptimizedModule", "_orig_mod"),
    ("torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "ActivationWrapper",
     "_checkpoint_wrapped_module"),
    (*_FSDP1, "_fsdp_wrapped_module"),
)


def _imported(where: str, name: str) -> type | None:
    """The class `where.name` if its module is imported (else no instance of it can exist)."""
    return getattr(sys.modules.get(where), name, None)


def _wrappers() -> dict[type, str]:
    """The wrapper classes imported so far -> the attribute holding the wrapped module."""
    return {cls: attribute for where, name, attribute in _WRAPPERS
            if (cls := _imported(where, name)) is not None}


def wrapped_attribute(module: object, wrappers: dict[type, str] | None = None) -> str | None:
    """The attribute holding the wrapped module if `module` is a wrapper, else None."""
    for cls, attribute in (_wrappers() if wrappers is None else wrappers).items():
        if isinstance(module, cls):
            return attribute
    return None


def _is_fsdp1(module: object) -> bool:
    cls = _imported(*_FSDP1)
    return cls is not None and isinstance(module, cls)


def canonical_name(model: nn.Module, name: str) -> str:
    """`name` (of a parameter, buffer, module or state-dict entry of `model`) without the
    segments of wrapper modules: the canonical FQN."""
    kept, obj, wrappers = [], model, _wrappers()
    for part in name.split(".") if name else []:
        attribute = wrapped_attribute(obj, wrappers)
        while attribute is not None and part != attribute:  # a key the wrapper shortened
            obj = getattr(obj, attribute)
            attribute = wrapped_attribute(obj, wrappers)
        if attribute is not None:  # the wrapper's own segment: left out
            obj = getattr(obj, attribute)
            continue
        kept.append(part)
        obj = getattr(obj, part, None) if isinstance(obj, nn.Module) else None
    return ".".join(kept)


@dataclass(frozen=True)
class ExpertTensor:
    """One expert tensor (a parameter or buffer of a layer's `experts`): rows [offset, offset +
    local) of num_experts, the first dim."""

    fqn: str  # canonical
    tensor: torch.Tensor  # the object itself (a DTensor parameter under FSDP2)
    layer: nn.Module  # its MoELayer

    @property
    def num_experts(self) -> int:
        return self.layer.config.num_experts

    @property
    def local_experts(self) -> int:
        return self.layer.num_local_experts

    @property
    def offset(self) -> int:
        return self.layer.expert_offset

    def logical(self, value: torch.Tensor) -> torch.Tensor:
        """`value` (this tensor, or optimizer state shaped like it) as this rank's logical rows
        [E / EP, ...]: itself, or for a placed layer (replica slots, a planned placement) its
        slots gathered back into expert order (a collective over the EP group)."""
        layer = self.layer
        if not layer.placed:
            return value
        return to_logical(value, layer.placement.slots, self.num_experts, layer.group)

    def first_copies(self) -> list[int]:
        """This rank's rows that hold the first copy of their expert (each expert once)."""
        return first_copies(self.layer.placement.slots, self.layer.group.rank)

    def physical(self, rows: torch.Tensor) -> torch.Tensor:
        """The inverse of `logical`: this rank's rows of the tensor from every rank's logical
        rows (a collective for a placed layer)."""
        layer = self.layer
        return to_slots(rows, layer.placement.slots, layer.group) if layer.placed else rows


class ExpertMap:
    """The expert tensors of `model` (wrapped or not), by object and by canonical FQN; and the
    MoELayers with their canonical names. Build it when you need it: it reflects the model's
    tensors at that moment."""

    def __init__(self, model: nn.Module) -> None:
        names: dict[int, str] = {}  # tensor -> its first name (made canonical for experts only)
        for name, t in [*model.named_parameters(remove_duplicate=False),
                        *model.named_buffers(remove_duplicate=False)]:
            names.setdefault(id(t), name)
        self.layers: dict[str, nn.Module] = {}
        self.by_id: dict[int, ExpertTensor] = {}
        for name, module in model.named_modules():
            if isinstance(module, MoELayer):
                self.layers.setdefault(canonical_name(model, name), module)
            elif _is_fsdp1(module) and any(isinstance(m, MoELayer) for m in module.modules()):
                raise ConfigError(
                    "FSDP1 (FullyShardedDataParallel) flattens expert parameters together with "
                    "dense ones and averages them over its whole group, which mixes different "
                    "ranks' experts; use schedmoe.parallel.fully_shard_moe (FSDP2) or "
                    "data_parallel (DDP)")
        for layer in self.layers.values():
            for t in [*layer.experts.parameters(), *layer.experts.buffers()]:
                if id(t) not in names:
                    raise CheckpointError(
                        f"an expert tensor of shape {tuple(t.shape)} is not reachable from the "
                        "model's named parameters or buffers; pass the model that holds the "
                        "MoELayers")
                self.by_id[id(t)] = ExpertTensor(canonical_name(model, names[id(t)]), t, layer)
        self.by_fqn = {e.fqn: e for e in self.by_id.values()}

    def __contains__(self, tensor: object) -> bool:
        return id(tensor) in self.by_id

    def get(self, tensor: object) -> ExpertTensor | None:
        return self.by_id.get(id(tensor))

    def parameters(self) -> list[nn.Parameter]:
        """The expert parameters, in model order."""
        return [e.tensor for e in self.by_id.values() if isinstance(e.tensor, nn.Parameter)]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters owned by one EP rank (keep them out of data-parallel all-reduce); found by
    identity, so wrappers and FSDP2's replaced parameters are found too."""
    return ExpertMap(model).parameters()


def non_expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters replicated across ranks (gates, shared experts and the rest of the model)."""
    experts = ExpertMap(model)
    return [p for p in model.parameters() if p not in experts]
