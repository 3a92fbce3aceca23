"""The parallel layout of MoE training: expert-parallel (EP), expert-data-parallel (EDP) and
data-parallel (DP) groups, on a DeviceMesh so that it composes with PyTorch's parallelism.

Legend: W ranks = EDP x EP; E experts, E/EP per rank.

An EP group holds one copy of every expert (E/EP per rank): the layers are built with
`group=layout.ep_group`. An EDP group holds the ranks with the same experts, one per EP group.
Dense parameters are data parallel over all W ranks, which all see different tokens. By
default the EP groups are consecutive ranks (with torchrun's numbering an EP group no larger
than a node stays inside it, Megatron's and torchtitan's choice); `ep_contiguous=False` strides
them (EP group j = ranks j, j + EDP, ...).

`mesh` is 2-D with dims ("ep", "edp"), EP first: the global rows of an expert tensor are split
by EP rank, then (FSDP2) by EDP rank, so an expert tensor is the DTensor `(Shard(0),
Replicate())` (DDP recipe) or `(Shard(0), Shard(0))` (FSDP2 recipe) on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from ..comm.groups import EPGroup, collective, serves_cuda
from ..control.load import LoadStats, read_loads
from ..errors import ConfigError
from ..layer import MoELayer
from ..streams.lanes import lanes_for


@dataclass(frozen=True)
class ParallelLayout:
    ep_size: int
    mesh: DeviceMesh  # ("ep", "edp")
    world_mesh: DeviceMesh  # ("dp",): every rank, for dense FSDP

    @property
    def world_size(self) -> int:
        return self.mesh.size()

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ep")

    @property
    def edp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("edp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.world_mesh.get_group("dp")

    @property
    def ep_rank(self) -> int:
        return self.mesh.get_local_rank("ep")

    @property
    def edp_rank(self) -> int:
        return self.mesh.get_local_rank("edp")

    def describe(self) -> str:
        return (f"{self.world_size} ranks = EP {self.ep_size} x EDP {self.edp_size}; EP groups "
                f"{self.mesh.mesh.t().tolist()}")


def init_parallel(ep_size: int, *, ep_contiguous: bool = True,
                  device_type: str | None = None) -> ParallelLayout:
    """The layout of the initialised world for `ep_size` (a collective: every rank calls it).
    `device_type`: the mesh's, default "cuda" on NCCL, else "cpu"."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("init_parallel needs torch.distributed initialised: call "
                          "dist.init_process_group (or run under torchrun) first")
    world = dist.get_world_size()
    if not isinstance(ep_size, int) or ep_size <= 0 or world % ep_size:
        raise ConfigError(f"ep_size must be a positive divisor of the world size ({world}), "
                          f"got {ep_size!r}")
    edp = world // ep_size
    # grid[j][i]: the rank with EP index j and EDP index i
    grid = (torch.arange(world).view(edp, ep_size).t() if ep_contiguous
            else torch.arange(world).view(ep_size, edp))
    timeout = EPGroup.resolve(None).timeout()
    ep_pg = _member_group([grid[:, i].tolist() for i in range(edp)], timeout)
    edp_pg = _member_group(grid.tolist(), timeout)
    if device_type is None:
        device_type = "cuda" if serves_cuda(dist.group.WORLD) else "cpu"
    mesh = DeviceMesh.from_group([ep_pg, edp_pg], device_type, mesh=grid.contiguous(),
                                 mesh_dim_names=("ep", "edp"))
    world_mesh = DeviceMesh.from_group(dist.group.WORLD, device_type,
                                       mesh=torch.arange(world), mesh_dim_names=("dp",))
    return ParallelLayout(ep_size, mesh, world_mesh)


def _member_group(rank_lists: list[list[int]], timeout) -> dist.ProcessGroup:
    """Create one group per list (every rank creates all, in the same order); return the one
    this rank is in."""
    me, mine = dist.get_rank(), None
    for ranks in rank_lists:
        pg = dist.new_group(ranks, timeout=timeout)
        if me in ranks:
            mine = pg
    return mine


def named_moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's MoELayers with their names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def moe_layers(model: nn.Module) -> list[nn.Module]:
    """The model's MoELayers."""
    return [layer for _, layer in named_moe_layers(model)]


def expert_load(model: nn.Module, group: dist.ProcessGroup | None = None
                ) -> dict[str, LoadStats]:
    """Each MoE layer's load (pairs per expert, a moving average over its recent calls),
    summed over `group` (default: every rank; each routes only its own tokens, so the sum
    over the EP group and its data-parallel replicas is the whole load), read against the
    layer's placement. A collective: every rank of `group` calls it; one all-reduce for all
    layers. Layers not called yet are left out."""
    layers = [(name, layer) for name, layer in named_moe_layers(model)
              if layer.load.average_2E is not None]
    if not layers:
        return {}
    lanes = lanes_for(layers[0][1].load.average_2E.device)
    stacked = torch.cat([layer.load.read(lanes).reshape(-1) for _, layer in layers])
    if dist.is_initialized():
        with collective("the expert load's all-reduce", EPGroup.resolve(group)):
            dist.all_reduce(stacked, group=group)
    loads = read_loads(stacked.tolist(), [layer for _, layer in layers])  # a report: host sync
    return {name: load for (name, _), load in zip(layers, loads)}


def check_layers(model: nn.Module, layout: ParallelLayout) -> list[tuple[str, nn.Module]]:
    """The model's named MoELayers, after checking that each one's EP group is the layout's."""
    want = dist.get_process_group_ranks(layout.ep_group)
    layers = named_moe_layers(model)
    for _, layer in layers:
        ranks = (dist.get_process_group_ranks(layer.group.pg) if layer.group.distributed
                 else [dist.get_rank()])
        if ranks != want:
            raise ConfigError(f"an MoELayer's EP group is ranks {ranks}, the layout's is {want}:"
                              " build the layers with group=layout.ep_group")
    return layers


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
