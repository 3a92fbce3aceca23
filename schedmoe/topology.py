"""Where the ranks of an EP group live: P = N nodes x L ranks per node, and the sub-groups the
hierarchical A2A algorithms need.

Group rank r sits on node r // L with local index r % L (torchrun's numbering). The intra-node
group holds the L ranks of one node; the inter-node group the N ranks with the same local index;
`spare` is a second communicator over the whole EP group, so that two exchanges can be in flight
at once on separate communicators. Only what needs its own communicator gets one: a
single-rank group needs none, and on one node (or with one rank per node) the EP group's own
communicator serves, since there the two kinds of traffic never run at once.

Lifetime: a sub-group is keyed by its role and its global ranks, and shared by every layer and
every EP group over the same ranks, so creating layers (or EP groups over the same ranks) again
and again creates no new communicators: the number alive is bounded by the distinct rank sets
used. They are not destroyed mid-run on purpose: torch names a locally synchronised group by its
ranks and the number of live groups, so a destroyed and re-created sub-group reuses its
predecessor's name and store keys, and gloo then connects to the dead group's addresses
(measured: "Connection refused" in connectFullMesh). `release()` destroys them all; call it
just before `dist.destroy_process_group()`. Sub-groups found dead (a re-initialised world) are
created afresh.
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


_SUBGROUPS: dict[tuple[str, tuple[int, ...]], EPGroup] = {}  # (role, global ranks) -> group


def default_local_size(group: EPGroup) -> int:
    """torchrun's LOCAL_WORLD_SIZE when set, else the whole group on one node."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value else group.size


def topology(group: EPGroup, local_size: int | None = None) -> Topology:
    """The topology of `group` with `local_size` ranks per node (sub-groups created once)."""
    local = default_local_size(group) if local_size is None else local_size
    if not isinstance(local, int) or local <= 0 or group.size % local:
        raise ConfigError(
            f"local_size (ranks per node) must divide the EP group size {group.size}, got "
            f"{local}; pass local_size= or launch with torchrun so LOCAL_WORLD_SIZE is set"
        )
    if not group.distributed:
        return Topology(group, 1, group, group, group)
    ranks = tuple(dist.get_process_group_ranks(group.pg))
    nodes, node, local_rank = group.size // local, group.rank // local, group.rank % local
    if nodes == 1 or local == 1:  # one kind of traffic only: the EP group's communicator
        alone = EPGroup(None, 0, 1)
        return Topology(group, local, intra=group if nodes == 1 else alone,
                        inter=group if local == 1 else alone, spare=group)
    intra_ranks = [ranks[node * local + i] for i in range(local)]
    inter_ranks = [ranks[n * local + local_rank] for n in range(nodes)]
    return Topology(group, local, intra=_shared("intra", intra_ranks, local_rank, group),
                    inter=_shared("inter", inter_ranks, node, group),
                    spare=_shared("spare", list(ranks), group.rank, group))


def _shared(role: str, global_ranks: list[int], my_rank: int, parent: EPGroup) -> EPGroup:
    """The `role` sub-group over `global_ranks`, created on first use."""
    key = (role, tuple(global_ranks))
    if key not in _SUBGROUPS or not _alive(_SUBGROUPS[key].pg):
        _SUBGROUPS[key] = _subgroup(global_ranks, my_rank, parent)
    return _SUBGROUPS[key]


def _alive(pg: dist.ProcessGroup) -> bool:
    try:
        dist.get_process_group_ranks(pg)
        return True
    except (ValueError, RuntimeError, KeyError):
        return False


def release() -> None:
    """Destroy every sub-group; call it just before `dist.destroy_process_group()`.
    Gloo sub-groups left for the interpreter to collect at exit can abort the process
    ("terminate called without an active exception")."""
    for sub in _SUBGROUPS.values():
        if _alive(sub.pg):
            dist.destroy_process_group(sub.pg)
    _SUBGROUPS.clear()


def _subgroup(global_ranks: list[int], my_rank: int, parent: EPGroup) -> EPGroup:
    # Only the members call new_group (local synchronisation), so nodes need not agree on order.
    with collective(f"creating the sub-group of ranks {global_ranks}", parent):
        pg = dist.new_group(global_ranks, timeout=parent.timeout(),
                            use_local_synchronization=True)
    return EPGroup(pg, my_rank, len(global_ranks))
