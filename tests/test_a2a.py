"""Every registered A2A algorithm against torch.distributed.all_to_all_single."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from schedmoe.a2a_algos import all_to_all
from schedmoe.comm.groups import EPGroup
from schedmoe.errors import A2AError
from schedmoe.registry import registry
from schedmoe.tools.testing import run_ranks
from schedmoe.comm import topology as topology_module
from schedmoe.comm.topology import release, topology

DTYPES = [torch.float32, torch.bfloat16, torch.uint8]


def random_splits(world: int, seed: int) -> list[list[int]]:
    """splits[src][dst]: rows rank src sends to rank dst, zeros included."""
    g = torch.Generator().manual_seed(seed)
    splits = torch.randint(0, 5, (world, world), generator=g)
    splits[torch.rand(world, world, generator=g) < 0.25] = 0
    return splits.tolist()


def payload(rank: int, rows: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (rows, 3), generator=g, dtype=torch.uint8)
    return torch.randn(rows, 3, generator=g).to(dtype)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_algorithms(rank: int, world: int, names: list[str]) -> int:
    group = EPGroup.resolve(None)
    checked = 0
    for name, local_size in [(n, L) for n in names for L in divisors(world)]:
        algo = registry("a2a").get(name)(group, local_size)
        for seed in range(3):
            splits = random_splits(world, seed)
            send = [splits[rank][d] for d in range(world)]
            recv = [splits[s][rank] for s in range(world)]
            for dtype in DTYPES:
                x = payload(rank, sum(send), dtype, seed)
                expected = x.new_empty(sum(recv), 3)
                dist.all_to_all_single(expected, x, recv, send)
                assert torch.equal(algo.exchange(x, recv, send), expected), \
                    (name, local_size, seed, dtype)
                assert torch.equal(algo.start(x, recv, send).wait(), expected)
                checked += 1
            # even splits (no split sizes given)
            x = payload(rank, 2 * world, torch.float32, seed)
            expected = torch.empty_like(x)
            dist.all_to_all_single(expected, x)
            assert torch.equal(algo.exchange(x), expected)
            # gradient: the reverse exchange of the output gradient
            x = payload(rank, sum(send), torch.float32, seed).requires_grad_()
            grad_out = payload(rank + 7, sum(recv), torch.float32, seed)
            (all_to_all(x, algo, recv, send) * grad_out).sum().backward()
            expected_grad = torch.empty(sum(send), 3)
            dist.all_to_all_single(expected_grad, grad_out, send, recv)
            assert torch.equal(x.grad, expected_grad), (name, local_size, seed, "grad")
        with pytest.raises(A2AError, match="input_splits sum to"):
            algo.exchange(torch.zeros(3, 2), [1] * world, [5] + [0] * (world - 1))
        with pytest.raises(A2AError, match=f"must be {world} non-negative sizes"):
            algo.exchange(torch.zeros(3, 2), [1] * world, [3])
    return checked


@pytest.mark.parametrize("world", [2, 4, 6, 8])
def test_algorithms_match_all_to_all_single(world):
    names = registry("a2a").names()
    assert {"nccl", "2dh", "pipe", "staged"} <= set(names)
    counts = run_ranks(check_algorithms, world, names, timeout=300)
    assert counts == [len(names) * len(divisors(world)) * 3 * len(DTYPES)] * world


def test_single_process_is_identity():
    algo = registry("a2a").get("nccl")(EPGroup.resolve(None))
    x = torch.randn(5, 2)
    assert torch.equal(algo.exchange(x), x)
    with pytest.raises(A2AError, match="not divisible"):
        registry("a2a").get("nccl")(EPGroup(None, 0, 2)).exchange(torch.zeros(3, 1))


def dies_mid_exchange(rank: int, world: int, name: str, before_topology: bool):
    dist.barrier()  # every rank past init: a death during another's init is not the case here
    algo = registry("a2a").get(name)(EPGroup.resolve(None), 2)
    if not before_topology:
        algo.topology  # noqa: B018  (creates the sub-groups on every rank)
    if rank == world - 1:
        import os
        os._exit(5)
    algo.exchange(torch.randn(4 * world, 3))


@pytest.mark.parametrize("names,before_topology", [(None, False), (["2dh"], True)])
def test_dead_rank_fails_every_algorithm_clearly(names, before_topology):
    """A rank dies in the exchange (or while the sub-groups are being created)."""
    from schedmoe.errors import PeerError, RankError
    for name in names or registry("a2a").names():
        results = run_ranks(dies_mid_exchange, 4, name, before_topology, return_exceptions=True,
                            collective_timeout=4, timeout=40)
        assert isinstance(results[-1], RankError) and "exit code 5" in str(results[-1])
        for rank, res in enumerate(results[:-1]):
            assert isinstance(res, PeerError), (name, rank, res)
            assert "peer rank died" in str(res)


def release_destroys(rank: int, world: int) -> bool:
    group = EPGroup.resolve(None)
    x = payload(rank, 2 * world, torch.float32, 0)
    expected = torch.empty_like(x)
    dist.all_to_all_single(expected, x)
    assert torch.equal(registry("a2a").get("pipe")(group, 2).exchange(x), expected)
    subgroups = topology(group, 2)
    release()
    registered = dist.distributed_c10d._world.pg_map  # torch's live groups
    assert not any(sub.pg in registered
                   for sub in (subgroups.intra, subgroups.inter, subgroups.spare))
    return not topology_module._SUBGROUPS


def test_release_destroys_the_cached_subgroups():
    assert run_ranks(release_destroys, 4, timeout=120) == [True] * 4


def matches_flat(algo, pg, seed: int) -> None:
    """One exchange with random uneven splits, and its gradient, against all_to_all_single."""
    me, size = dist.get_rank(pg), dist.get_world_size(pg)
    splits = random_splits(size, seed)
    send = [splits[me][d] for d in range(size)]
    recv = [splits[s][me] for s in range(size)]
    x = payload(me, sum(send), torch.float32, seed).requires_grad_()
    expected = x.new_empty(sum(recv), 3)
    dist.all_to_all_single(expected, x.detach(), recv, send, group=pg)
    out = all_to_all(x, algo, recv, send)
    assert torch.equal(out, expected), (type(algo).__name__, seed)
    grad_out = payload(me + 7, sum(recv), torch.float32, seed)
    (out * grad_out).sum().backward()
    expected_grad = torch.empty(sum(send), 3)
    dist.all_to_all_single(expected_grad, grad_out, send, recv, group=pg)
    assert torch.equal(x.grad, expected_grad), (type(algo).__name__, seed, "grad")


def strided_nodes(rank: int, world: int) -> dict:
    """Hosts alternate (nodes {0, 2} and {1, 3}); EP groups {0, 2} and {1, 3} are strided."""
    topology_module.host_identity = lambda: f"host{rank % 2}"
    strided = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
    cases = {"world, nodes from hosts": (None, None),
             "strided group, torchrun numbering": (strided, 2),
             "strided group, nodes from hosts": (strided, None)}
    nodes = {}
    for label, (pg, local_size) in cases.items():
        group = EPGroup.resolve(pg)
        ranks = dist.get_process_group_ranks(group.pg)
        topo = topology(group, local_size)
        nodes[label] = [[ranks[r] for r in node] for node in topo.nodes()]
        for name in ("2dh", "pipe"):
            for seed in range(3):
                matches_flat(registry("a2a").get(name)(group, local_size), group.pg, seed)
    return nodes


def test_nodes_come_from_hosts_and_strided_groups_get_the_right_nodes():
    per_rank = run_ranks(strided_nodes, 4, timeout=120)
    assert per_rank[0] == per_rank[2] and per_rank[1] == per_rank[3]
    assert per_rank[0]["world, nodes from hosts"] == [[0, 2], [1, 3]]
    assert per_rank[0]["strided group, torchrun numbering"] == [[0], [2]]  # nodes {0,1}, {2,3}
    assert per_rank[1]["strided group, torchrun numbering"] == [[1], [3]]
    assert per_rank[0]["strided group, nodes from hosts"] == [[0, 2]]  # both on host0
    assert per_rank[1]["strided group, nodes from hosts"] == [[1, 3]]


def test_uneven_nodes_are_refused():
    from schedmoe.errors import ConfigError
    from schedmoe.comm.topology import node_order
    with pytest.raises(ConfigError, match="unevenly"):
        node_order(["a", "a", "b"], [0, 1, 2])
    with pytest.raises(ConfigError, match="same order"):
        node_order(["a", "b", "b", "a"], [0, 1, 2, 3])  # node a = {0, 3}, node b = {1, 2}
    assert node_order(["a", "b", "a", "b"], [0, 1, 2, 3]) == ((0, 2, 1, 3), 2)
