"""Checkpoints with global expert identity, through torch.distributed.checkpoint (DCP).

Legend: E experts (global), E/EP per rank.

Every expert tensor (a parameter, and each optimizer state of its shape) is saved as a DTensor
of its global shape [E, ...] split by EP rank: `(Shard(0), Replicate())` on the layout's
("ep", "edp") mesh under the DDP recipe, `(Shard(0), Shard(0))` under FSDP2's (whose shards
are already split over EDP). DCP then stores each expert once, at its global index, and a load
at another EP size or world size reads each rank's new rows: it reshards. Dense tensors are
saved as they are (replicated ones written once; FSDP2's shards are DTensors already). Before
anything is read, the checkpoint's global shapes are compared with the model's: another
num_experts, expert shape or model raises CheckpointError naming the tensor.

`full_state_dict` is the other way out: every expert gathered into one plain state dict (for
`torch.save` on rank 0, or transformers), which `load_state_dict` slices on each rank.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..distributed import EPGroup
from ..errors import CheckpointError
from .identity import KEY
from .mesh import ParallelLayout, check_layers, local_part, named_moe_layers, unwrap


def save_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, layout: ParallelLayout,
                    extra: dict | None = None) -> None:
    """Save the model, the optimizer and `extra` (JSON-serialisable training state: step, ...)
    into the directory `path` (a collective: every rank calls it)."""
    state, _ = _sharded_state(model, optimizer, layout)
    state["extra"] = json.dumps(extra or {})  # a string: DCP saves it whole, from one rank
    dcp.save(state, checkpoint_id=os.fspath(path))


def load_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, layout: ParallelLayout) -> dict:
    """Load what `save_checkpoint` saved, at this model's (possibly different) EP size and
    world size; returns `extra`. A collective: every rank calls it."""
    path = os.fspath(path)
    state, originals = _sharded_state(model, optimizer, layout)
    _check_shapes(path, state, experts=originals.keys())
    state["extra"] = ""
    dcp.load(state, checkpoint_id=path)
    with torch.no_grad():  # DCP filled the tensors in place; the global views share storage
        for key, original in originals.items():
            local_part(original).copy_(local_part(state[key]))
            state[key] = original
        params = unwrap(model).state_dict(keep_vars=True)
        for key, value in state.items():
            if key.startswith("model."):
                local_part(params[key[len("model."):]]).copy_(local_part(value))
    if optimizer is not None:
        optim_state = {"state": {}, "param_groups": state["optim.param_groups"]}
        for key, value in state.items():
            if key.startswith("optim.state."):
                fqn, name = key[len("optim.state."):].rsplit(".", 1)
                optim_state["state"].setdefault(fqn, {})[name] = value
        set_optimizer_state_dict(unwrap(model), optimizer, optim_state)
    return json.loads(state["extra"])


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                   layout: ParallelLayout) -> tuple[dict, dict]:
    """One flat dict: "model.<fqn>", "optim.state.<fqn>.<name>", "optim.param_groups"; every
    expert tensor as a DTensor of its global shape. And the tensors those replace, by key."""
    module = unwrap(model)
    rows = {}  # expert tensor fqn -> (E, E/EP)
    for name, layer in check_layers(module, layout):
        for pname, _ in layer.experts.named_parameters():
            rows[f"{name}.experts.{pname}".lstrip(".")] = (layer.config.num_experts,
                                                           layer.num_local_experts)
    state, originals = {}, {}
    entries = {f"model.{fqn}": (fqn, value) for fqn, value in module.state_dict().items()
               if fqn.rsplit(".", 1)[-1] != KEY}  # not the plain state dict's identity record
    if optimizer is not None:
        optim = get_optimizer_state_dict(module, optimizer)
        entries.update({f"optim.state.{fqn}.{name}": (fqn, value)
                        for fqn, named in optim["state"].items() for name, value in named.items()})
        state["optim.param_groups"] = optim["param_groups"]
    for key, (fqn, value) in entries.items():
        if fqn in rows and isinstance(value, torch.Tensor) and value.dim():
            originals[key] = value
            value = _global(value, rows[fqn], layout)
        state[key] = value
    return state, originals


def _global(value: torch.Tensor, rows: tuple[int, int], layout: ParallelLayout) -> DTensor:
    """This rank's expert rows as the global [E, ...] DTensor on the layout's mesh."""
    num_experts, local_experts = rows
    if isinstance(value, DTensor):  # FSDP2: [E/EP, ...] sharded over EDP already
        local, second = value.to_local(), Shard(0)
    else:
        local, second = value, Replicate()
    if value.shape[0] != local_experts:
        raise CheckpointError(f"an expert tensor of shape {tuple(value.shape)} does not start "
                              f"with the {local_experts} local experts")
    shape = torch.Size((num_experts, *value.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, layout.mesh, (Shard(0), second), run_check=False,
                              shape=shape, stride=stride)


def _check_shapes(path: str, state: dict, experts) -> None:
    """Raise CheckpointError if a tensor of `state` is missing from the checkpoint or has
    another global shape there (expert tensors first: their first dim is num_experts)."""
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    keys = [k for k in state if k in experts] + [k for k in state if k not in experts]
    for key in keys:
        value = state[key]
        if not isinstance(value, torch.Tensor):
            continue
        if key not in saved:
            raise CheckpointError(f"{key} is not in the checkpoint at {path}: it was saved from "
                                  "another model")
        size = getattr(saved[key], "size", None)
        if size is not None and tuple(size) != tuple(value.shape):
            kind = "expert tensor [num_experts, ...]" if key in experts else "tensor"
            raise CheckpointError(
                f"{key}: the checkpoint's {kind} has global shape {tuple(size)}, this model's "
                f"is {tuple(value.shape)}; num_experts and the expert and model sizes must "
                "match the checkpoint (the EP size and world size may differ)")


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain state dict with every expert gathered over its EP group (a collective: call it
    on every rank; DDP recipe or plain models). Save it from rank 0 with torch.save; it loads
    with `load_state_dict` into the model at any EP size, each rank taking its rows."""
    module = unwrap(model)
    out = module.state_dict()
    for name, layer in named_moe_layers(module):
        prefix = f"{name}." if name else ""
        for pname, p in layer.experts.named_parameters():
            out[f"{prefix}experts.{pname}"] = gather_experts(p.detach(), layer.group)
        out[prefix + KEY] = torch.tensor([0, layer.config.num_experts, layer.config.num_experts])
    return out


def gather_experts(local: torch.Tensor, group: EPGroup) -> torch.Tensor:
    """Every EP rank's rows of an expert tensor, in rank order: the global [E, ...] tensor."""
    if not group.distributed:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(group.size)]
    dist.all_gather(parts, local.contiguous(), group=group.pg)
    return torch.cat(parts)

