"""Where the ranks of an EP group live: P = N nodes x L ranks per node, and the sub-groups the
hierarchical A2A algorithms need.

Nodes come from the hosts' identities (`host_identity`: host name and network namespace,
gathered once over the EP group), not from rank numbers: an EP group may be strided across
nodes (ranks {0, 2} of two 2-rank nodes is one rank on each node). `local_size=L` overrides
this with torchrun's numbering of the world (global rank r on node r // L), for emulating nodes
on one host. Every node must hold the same number L of the group's ranks.

Positions: `order` lists the group's ranks node by node (node n's local rank l at position
n * L + l; nodes in the order of their first rank, locals in rank order). Topology-aware
algorithms work on positions; `A2AAlgorithm.start` permutes the payload into position order
and back when the order is not the identity. The intra-node group holds the L ranks of one node;
the inter-node group the N ranks with the same local index; `spare` is a second communicator
over the whole EP group, so that two exchanges can be in flight at once on separate
communicators. Only what needs its own communicator gets one: a single-rank group needs none,
and on one node (or with one rank per node) the EP group's own communicator serves, since there
the two kinds of traffic never run at once.

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
import socket
from dataclasses import dataclass
from functools import cached_property
from typing import Hashable

import torch.distributed as dist

from .groups import EPGroup, collective
from ..errors import ConfigError


@dataclass(frozen=True)
class Topology:
    group: EPGroup
    local_size: int  # L
    order: tuple[int, ...]  # the group's ranks node by node: position n * L + l
    intra: EPGroup  # this rank's node; its rank there is the local index
    inter: EPGroup  # ranks with this rank's local index; its rank there is the node index
    spare: EPGroup  # the EP group again, on its own communicator

    @property
    def num_nodes(self) -> int:
        return self.group.size // self.local_size

    @cached_property  # computed once: same_node runs per peer on the exchange's path
    def positions(self) -> tuple[int, ...]:
        """Group rank -> position."""
        inverse = [0] * len(self.order)
        for position, rank in enumerate(self.order):
            inverse[rank] = position
        return tuple(inverse)

    @property
    def position(self) -> int:
        return self.positions[self.group.rank]

    @property
    def node(self) -> int:
        return self.position // self.local_size

    @property
    def local_rank(self) -> int:
        return self.position % self.local_size

    @property
    def in_rank_order(self) -> bool:
        """Whether positions are group ranks (every node's ranks consecutive)."""
        return self.order == tuple(range(self.group.size))

    def same_node(self, position: int) -> bool:
        return position // self.local_size == self.node

    def nodes(self) -> list[list[int]]:
        """The group ranks of each node."""
        L = self.local_size
        return [list(self.order[n * L:(n + 1) * L]) for n in range(self.num_nodes)]


_SUBGROUPS: dict[tuple[str, tuple[int, ...]], EPGroup] = {}  # (role, global ranks) -> group


def host_identity() -> str:
    """This process's machine: its host name and network namespace (the emulated nodes of
    `schedmoe.tools.emulate` share a host name but each has its own namespace)."""
    try:
        namespace = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}/{namespace}"


def node_keys(group: EPGroup, local_size: int | None) -> list[Hashable]:
    """One key per group rank, equal for ranks on the same node (a collective without
    `local_size`: the host identities are gathered over the group)."""
    ranks = dist.get_process_group_ranks(group.pg)
    if local_size is not None:
        if not isinstance(local_size, int) or local_size <= 0:
            raise ConfigError(f"local_size (ranks per node) must be a positive int, got "
                              f"{local_size!r}")
        return [r // local_size for r in ranks]
    keys: list = [None] * group.size
    with collective("gathering the host of every rank", group):
        dist.all_gather_object(keys, host_identity(), group=group.pg)
    return keys


def node_order(keys: list[Hashable], global_ranks: list[int]) -> tuple[tuple[int, ...], int]:
    """(order, L): the group ranks node by node, and the ranks per node."""
    nodes: dict[Hashable, list[int]] = {}
    for rank, key in enumerate(keys):
        nodes.setdefault(key, []).append(rank)
    members = list(nodes.values())
    sizes = sorted({len(m) for m in members})
    if len(sizes) > 1:
        raise ConfigError(
            f"the EP group's ranks are spread unevenly over nodes ({[len(m) for m in members]} "
            "ranks per node); hierarchical A2A needs the same number on every node: choose EP "
            "groups that do, or use a2a='nccl'")
    local = sizes[0]
    if any([global_ranks[r] for r in m] != sorted(global_ranks[r] for r in m) for m in members):
        raise ConfigError("the EP group's ranks are not numbered in the order of their global "
                          "ranks; build it with dist.new_group or schedmoe.parallel")
    for l in range(local):  # inter-node groups are ordered by global rank, like the nodes
        column = [global_ranks[m[l]] for m in members]
        if column != sorted(column):
            raise ConfigError(
                f"the nodes of the EP group ({members}, group ranks) are not in the same order "
                "for every local index; number the ranks node by node or use a2a='nccl'")
    return tuple(r for m in members for r in m), local


def topology(group: EPGroup, local_size: int | None = None) -> Topology:
    """The topology of `group`: nodes from the hosts (or `local_size`, see the module
    docstring); sub-groups created once."""
    if not group.distributed:
        return Topology(group, 1, (0,), group, group, group)
    ranks = dist.get_process_group_ranks(group.pg)
    order, local = node_order(node_keys(group, local_size), ranks)
    nodes = group.size // local
    position = order.index(group.rank)
    node, local_rank = position // local, position % local
    if nodes == 1 or local == 1:  # one kind of traffic only: the EP group's communicator
        alone = EPGroup(None, 0, 1)
        return Topology(group, local, order, intra=group if nodes == 1 else alone,
                        inter=group if local == 1 else alone, spare=group)
    intra_ranks = [ranks[order[node * local + i]] for i in range(local)]
    inter_ranks = [ranks[order[n * local + local_rank]] for n in range(nodes)]
    return Topology(group, local, order, intra=_shared("intra", intra_ranks, local_rank, group),
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
