"""Where the ranks of an EP group live: P = N nodes x L ranks per node, and the sub-groups the
hierarchical A2A algorithms need.

Group rank r sits on node r // L with local index r % L (torchrun's numbering). The intra-node
group holds the L ranks of one node; the inter-node group the N ranks with the same local index;
`spare` is a second communicator over the whole EP group, so that two exchanges can be in flight
at once on separate communicators. Groups are created once per (EP group, L) and cached until
`release()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

from .distributed import EPGroup, collective
from .errors import ConfigError


@dataclass(frozen=True)
class Topology:
    group: EPGroup
    local_size: int  # L
    intra: EPGroup  # this rank's node; its rank there is the local index
    inter: EPGroup  # ranks with this rank's local index; its rank there is the node index
    spare: EPGroup  # the EP group again, on its own communicator

    @property
    def num_nodes(self) -> int:
        return self.group.size // self.local_size

    @property
    def node(self) -> int:
        return self.group.rank // self.local_size

    @property
    def local_rank(self) -> int:
        return self.group.rank % self.local_size

    def same_node(self, group_rank: int) -> bool:
        return group_rank // self.local_size == self.node


_CACHE: dict[tuple, Topology] = {}


def default_local_size(group: EPGroup) -> int:
    """torchrun's LOCAL_WORLD_SIZE when set, else the whole group on one node."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value else group.size


def topology(group: EPGroup, local_size: int | None = None) -> Topology:
    """The (cached) topology of `group` with `local_size` ranks per node."""
    local = default_local_size(group) if local_size is None else local_size
    if not isinstance(local, int) or local <= 0 or group.size % local:
        raise ConfigError(
            f"local_size (ranks per node) must divide the EP group size {group.size}, got "
            f"{local}; pass local_size= or launch with torchrun so LOCAL_WORLD_SIZE is set"
        )
    if not group.distributed:
        return Topology(group, 1, group, group, group)
    ranks = tuple(dist.get_process_group_ranks(group.pg))
    key = (group.pg, local)  # the group object: a re-initialised world gets new sub-groups
    if key not in _CACHE:
        node, local_rank = group.rank // local, group.rank % local
        intra_ranks = [ranks[node * local + i] for i in range(local)]
        inter_ranks = [ranks[n * local + local_rank] for n in range(group.size // local)]
        _CACHE[key] = Topology(
            group, local,
            intra=_subgroup(intra_ranks, local_rank, group),
            inter=_subgroup(inter_ranks, node, group),
            spare=_subgroup(list(ranks), group.rank, group),
        )
    return _CACHE[key]


def release() -> None:
    """Destroy the cached sub-groups; call it just before `dist.destroy_process_group()`.
    Gloo sub-groups left for the interpreter to collect at exit can abort the process
    ("terminate called without an active exception"). Not for use mid-run: torch names
    sub-groups by their ranks and the live group count, so new ones would reuse stale names."""
    for topo in _CACHE.values():
        for sub in (topo.intra, topo.inter, topo.spare):
            dist.destroy_process_group(sub.pg)
    _CACHE.clear()


def _subgroup(global_ranks: list[int], my_rank: int, parent: EPGroup) -> EPGroup:
    # Only the members call new_group (local synchronisation), so nodes need not agree on order.
    with collective(f"creating the sub-group of ranks {global_ranks}", parent):
        pg = dist.new_group(global_ranks, timeout=parent.timeout(),
                            use_local_synchronization=True)
    return EPGroup(pg, my_rank, len(global_ranks))
