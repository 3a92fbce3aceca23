"""The placement planner (plan/placement.py): EPLB-style replication and packing, node-first,
moves in the objective, checked against brute force and by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from schedmoe.errors import ConfigError
from schedmoe.plan.placement import (EMPTY, Placement, initial_placement, pack,
                                     plan_placement, replicate, static_placement)


def zipf(num_experts: int, s: float, seed: int = 0) -> np.ndarray:
    load = 1.0 / np.arange(1, num_experts + 1) ** s
    return np.random.default_rng(seed).permutation(load) * 1000


def test_static_placement_is_todays_layout():
    p = static_placement(8, 4)
    assert p.slots == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert p.replicas().tolist() == [1] * 8
    assert p.rank_loads(np.arange(8.0)).tolist() == [1, 5, 9, 13]
    with pytest.raises(ConfigError, match="divide"):
        static_placement(6, 4)


def test_replicas_go_to_the_most_load_per_replica():
    assert replicate(np.array([9.0, 3.0, 1.0, 1.0]), ranks=2, redundant=1).tolist() == [2, 2, 1, 1]
    assert replicate(np.array([100.0, 1.0, 1.0, 1.0]), ranks=2, redundant=2).tolist() == \
        [2, 2, 2, 2]  # at most W replicas an expert: the rest go to the next
    assert replicate(np.array([8.0, 1.0]), ranks=4, redundant=1).tolist() == [4, 2]


def _best_balancedness(load: np.ndarray, ranks: int) -> float:
    """Brute force over every assignment of E experts to W ranks, E / W each (no replicas)."""
    n, best = load.size // ranks, 0.0
    for perm in itertools.permutations(range(load.size)):
        slots = tuple(tuple(sorted(perm[w * n:(w + 1) * n])) for w in range(ranks))
        best = max(best, Placement(slots, load.size).balancedness(load))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_greedy_packing_is_near_the_best_assignment(seed):
    load = zipf(8, 1.2, seed)
    plan = pack(load, np.ones(8, dtype=np.int64), ranks=4, slots=2)
    assert sorted(e for row in plan.slots for e in row) == list(range(8))
    assert plan.balancedness(load) >= 0.9 * _best_balancedness(load, 4)
    assert plan.balancedness(load) >= static_placement(8, 4).balancedness(load)


def test_replicas_balance_a_hot_expert_and_stay_apart():
    load = np.array([600.0] + [100.0] * 7)  # one expert at ~4.6x the mean
    choice = plan_placement(load, ranks=4, redundant=1)
    placement = choice.placement
    assert placement.replicas()[0] >= 2
    assert all(len(set(row)) == len(row) for row in placement.slots)  # no rank holds e twice
    assert placement.balancedness(load) >= 0.9 > static_placement(8, 4).balancedness(load)
    assert choice.candidates["current"]["balancedness"] < 0.7


def test_replicas_stay_in_a_node_when_it_costs_nothing():
    """8 ranks in 2 nodes of 4: node-first keeps more experts' replicas inside one node (their
    gradient sums stay off the network), at the same balancedness."""
    load = np.array([300.0, 250.0] + [100.0] * 14)
    replicas = replicate(load, 8, 1)
    near, anywhere = (pack(load, replicas, 8, 3, node_size=size) for size in (4, None))

    def spanning(plan: Placement) -> int:
        return sum(len({w // 4 for w in plan.holders(e)}) > 1 for e in range(16))

    assert spanning(near) < spanning(anywhere)
    assert {w // 4 for w in near.holders(0)} == {1}  # all 4 replicas of the hottest: one node
    assert near.balancedness(load) == pytest.approx(anywhere.balancedness(load))


def test_moves_decide_between_plans():
    load = zipf(16, 1.0)
    slow_moves = plan_placement(load, 4, seconds_per_pair=1e-6, seconds_per_move=10.0,
                                steps_between=10)
    assert slow_moves.reason.startswith("stay")
    assert slow_moves.placement == static_placement(16, 4)
    cheap = plan_placement(load, 4, seconds_per_pair=1e-6, seconds_per_move=1e-9)
    assert not cheap.reason.startswith("stay")
    assert cheap.placement.balancedness(load) > static_placement(16, 4).balancedness(load)
    balanced = plan_placement(np.full(16, 10.0), 4, seconds_per_move=1e-9)
    assert balanced.reason.startswith("stay")  # nothing to gain


def test_replica_slots_stay_empty_unless_a_replica_pays_for_its_gradient_sum():
    """Each replicated expert costs `seconds_per_replica` a step: under balanced routing the
    replica slots are left empty (no gradient sum, no moves); with one expert hotter than a
    rank's fair share, a replica of it pays and is made."""
    ranks, redundant, pair, replica = 4, 1, 1e-6, 150e-6
    start = initial_placement(16, ranks, redundant)  # a replica slot a rank, filled
    even = plan_placement(np.full(16, 100.0), ranks, redundant, current=start,
                          seconds_per_pair=pair, seconds_per_replica=replica)
    assert even.placement.replicated() == 0 and start.moves(even.placement) == 0
    assert all(row[-1] == EMPTY for row in even.placement.slots), even.placement
    assert even.placement.balancedness(np.full(16, 100.0)) == 1.0
    hot = np.full(16, 100.0)
    hot[5] = 1600.0  # 4x a rank's fair share (4 experts a rank)
    skewed = plan_placement(hot, ranks, redundant, current=even.placement,
                            seconds_per_pair=pair, seconds_per_replica=replica)
    assert skewed.placement.replicas()[5] >= 2, skewed
    assert skewed.placement.balancedness(hot) > 0.9
    free = plan_placement(hot, ranks, redundant, seconds_per_pair=pair, seconds_per_replica=1.0)
    assert free.placement.replicated() == 0  # replicas dearer than any gain: none made
    empty = Placement(((0, 1, 2, 3, EMPTY),) + tuple(
        tuple(range(4 * w, 4 * w + 4)) + (EMPTY,) for w in range(1, 4)), 16)
    assert empty.rank_loads(hot).tolist() == [400.0, 1900.0, 400.0, 400.0]


def test_kept_plan_moves_fewer_experts():
    load = zipf(16, 1.0, seed=3)
    first = plan_placement(load, 4, seconds_per_move=0.0).placement
    drifted = load * np.random.default_rng(7).uniform(0.8, 1.2, 16)
    choice = plan_placement(drifted, 4, current=first, seconds_per_move=0.0)
    assert choice.candidates["kept"]["moves"] <= choice.candidates["fresh"]["moves"]


def test_bad_load_is_refused():
    with pytest.raises(ConfigError, match="one per expert"):
        plan_placement(np.ones(6), ranks=4)
    with pytest.raises(ConfigError, match="one per expert"):
        plan_placement(-np.ones(8), ranks=4)


def test_packing_never_paints_itself_into_a_corner():
    """Greedy packing can leave the last free slots on ranks that already hold the expert it
    must place: it then moves another expert to make room (every random load packs)."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        ranks = int(rng.choice([2, 4, 8]))
        experts = ranks * int(rng.integers(1, 4))
        redundant = int(rng.integers(1, experts - experts // ranks + 1))
        load = rng.pareto(1.0, experts) + 0.01
        plan = pack(load, replicate(load, ranks, redundant), ranks,
                    experts // ranks + redundant, node_size=2 if trial % 2 else None)
        assert all(len(set(row)) == len(row) == experts // ranks + redundant
                   for row in plan.slots)
        assert (plan.replicas() == replicate(load, ranks, redundant)).all()
