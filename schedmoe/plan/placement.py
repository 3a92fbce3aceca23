"""Expert placement: which logical expert each physical expert slot of each rank holds, and a
planner that balances the ranks under skewed routing (DeepSeek's EPLB, chosen online as
SmartMoE does).

Legend: E logical experts, W ranks, S = E / W + R physical slots per rank (R redundant),
l_E the load (pairs per step) of each logical expert. A slot may stay empty (EMPTY): R is
the most replicas a rank may hold, not a number it must.

A replica of expert e gets l_e / r_e of its load (its pairs are split evenly across its r_e
replicas); a rank's load is the sum over its slots. The planner (`plan_placement`):
1. replicas: every expert starts with one; each of the W R redundant slots goes, in turn, to
   the expert with the most load per replica;
2. packing: replicas, heaviest first, each onto the least loaded rank with a free slot that
   does not hold that expert yet, preferring a rank on a node that already holds a replica of
   it (its gradient sum then stays inside the node) when that costs no more than the lightest;
3. choice: the candidates (the current placement; the plan from scratch and the plan that
   keeps each rank's current experts where it can, each with the replicas and without them,
   the replica slots left empty; the static placement, its replica slots empty) are scored
   by the step time they predict (the slowest rank's load, `seconds_per_pair`, plus each
   replicated expert's gradient sum, `seconds_per_replica`) plus the cost of moving the
   experts that change rank (`seconds_per_move`, amortised over `steps_between`); a new plan
   is taken only when its predicted gain beats the cost of moving; ties go to fewer moves.
Pure host-side functions on numpy arrays: every rank computes the same plan from the same
(all-reduced) load.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError

EMPTY = -1  # a slot that holds no expert (the same mark as ops/experts/replicas.py's)


@dataclass(frozen=True)
class Placement:
    """`slots` [W, S]: the logical expert in each physical slot of each rank."""

    slots: tuple[tuple[int, ...], ...]
    num_experts: int

    @property
    def ranks(self) -> int:
        return len(self.slots)

    @property
    def slots_per_rank(self) -> int:
        return len(self.slots[0])

    def replicas(self) -> np.ndarray:
        """r_E: how many slots hold each expert."""
        held = np.asarray(self.slots).reshape(-1)
        return np.bincount(held[held != EMPTY], minlength=self.num_experts)

    def replicated(self) -> int:
        """How many experts have more than one replica (each costs a gradient sum a step)."""
        return int((self.replicas() > 1).sum())

    def rank_loads(self, load_E: np.ndarray) -> np.ndarray:
        """Each rank's load: its slots' shares l_e / r_e (an empty slot's: 0, the last)."""
        share_E = np.asarray(load_E, dtype=np.float64) / np.maximum(self.replicas(), 1)
        return np.append(share_E, 0.0)[np.asarray(self.slots)].sum(axis=1)

    def balancedness(self, load_E: np.ndarray) -> float:
        """mean / max load per rank (1.0: even)."""
        loads = self.rank_loads(load_E)
        return float(loads.mean() / loads.max()) if loads.max() > 0 else 1.0

    def holders(self, expert: int) -> list[int]:
        return [w for w, row in enumerate(self.slots) if expert in row]

    def moves(self, other: "Placement") -> int:
        """Experts that must be copied to reach `other`: slots of `other` whose expert the
        rank does not hold here."""
        return sum(len(set(new) - set(old) - {EMPTY})
                   for old, new in zip(self.slots, other.slots))


def static_placement(num_experts: int, ranks: int) -> Placement:
    """Rank w holds experts [w E / W, (w + 1) E / W): today's layout, no replicas."""
    if num_experts % ranks:
        raise ConfigError(f"{num_experts} experts do not divide over {ranks} ranks")
    n = num_experts // ranks
    return Placement(tuple(tuple(range(w * n, (w + 1) * n)) for w in range(ranks)),
                     num_experts)


def replicate(load_E: np.ndarray, ranks: int, redundant: int) -> np.ndarray:
    """r_E: one replica each, then each of the W R redundant slots to the expert with the
    most load per replica (ties: the lower expert id); at most W replicas an expert."""
    load_E = np.asarray(load_E, dtype=np.float64)
    replicas = np.ones(load_E.size, dtype=np.int64)
    heap = [(-load_E[e], e) for e in range(load_E.size)]
    heapq.heapify(heap)
    for _ in range(ranks * redundant):
        while True:
            _, e = heapq.heappop(heap)
            if replicas[e] < ranks:
                break
        replicas[e] += 1
        heapq.heappush(heap, (-load_E[e] / replicas[e], e))
    return replicas


def pack(load_E: np.ndarray, replicas_E: np.ndarray, ranks: int, slots: int,
         node_size: int | None = None, keep: Placement | None = None) -> Placement:
    """Replicas heaviest first onto the least loaded rank with a free slot that lacks the
    expert (node-first: a rank on a node already holding the expert wins a tie within one
    replica's load); with `keep`, each rank first keeps the experts it holds there that the
    plan still has replicas for. Slots left over stay EMPTY."""
    load_E = np.asarray(load_E, dtype=np.float64)
    share_E = load_E / replicas_E
    rows: list[list[int]] = [[] for _ in range(ranks)]
    rank_load = np.zeros(ranks)
    left = replicas_E.copy()
    if keep is not None:
        for w, held in enumerate(keep.slots):
            for e in held:
                if e != EMPTY and left[e] > 0 and len(rows[w]) < slots and e not in rows[w]:
                    rows[w].append(e)
                    rank_load[w] += share_E[e]
                    left[e] -= 1
    todo = sorted(((share_E[e], e) for e in range(load_E.size) for _ in range(left[e])),
                  key=lambda item: (-item[0], item[1]))
    node = (lambda w: w // node_size) if node_size else (lambda w: 0)
    for share, e in todo:
        free = [w for w in range(ranks) if len(rows[w]) < slots and e not in rows[w]]
        if not free:  # the free slots are all on ranks holding e: make room elsewhere
            free = [_make_room(rows, rank_load, share_E, e, slots)]
        lightest = min(rank_load[w] for w in free)
        nodes = {node(w) for w in range(ranks) if e in rows[w]}
        near = [w for w in free if node(w) in nodes and rank_load[w] <= lightest + share]
        w = min(near or free, key=lambda r: (rank_load[r], r))
        rows[w].append(e)
        rank_load[w] += share
    return _padded(Placement(tuple(tuple(sorted(row)) for row in rows), int(load_E.size)), slots)


def _make_room(rows: list[list[int]], rank_load: np.ndarray, share_E: np.ndarray, e: int,
               slots: int) -> int:
    """A rank with a free slot holds e: move the lightest expert it lacks from a full rank
    that lacks e onto it, and return that full rank (one exists: e has fewer than W replicas,
    and a full rank holds more experts than a rank with a free slot, so not only ones it
    shares with it)."""
    w = next(r for r in range(len(rows)) if len(rows[r]) < slots)
    v = min((r for r in range(len(rows)) if e not in rows[r]), key=lambda r: rank_load[r])
    x = min((x for x in rows[v] if x not in rows[w]), key=lambda x: share_E[x])
    rows[v].remove(x)
    rows[w].append(x)
    rank_load[v] -= share_E[x]
    rank_load[w] += share_E[x]
    return v


@dataclass
class PlanChoice:
    """The placement chosen and why: each candidate's predicted seconds per step and moves."""

    placement: Placement
    reason: str
    candidates: dict[str, dict]


def plan_placement(load_E: np.ndarray, ranks: int, redundant: int = 0,
                   current: Placement | None = None, node_size: int | None = None,
                   seconds_per_pair: float = 1e-6, seconds_per_move: float = 0.0,
                   steps_between: int = 100, seconds_per_replica: float = 0.0) -> PlanChoice:
    """The placement for the next `steps_between` steps (module docstring): the candidate with
    the least predicted time per step, moves amortised, kept only if it beats staying."""
    load_E = np.asarray(load_E, dtype=np.float64)
    if load_E.ndim != 1 or load_E.size % ranks or (load_E < 0).any():
        raise ConfigError(f"the load must be {ranks} x k non-negative numbers, one per expert;"
                          f" got shape {load_E.shape}")
    current = current or static_placement(load_E.size, ranks)
    slots = load_E.size // ranks + redundant
    candidates = {"current": current}
    # Without replicas, E / W experts a rank as without replica slots, the slots left empty
    # (measured: a rank holding more experts than another is slower than the pairs predict).
    for kind, replicas_E, held in (("", replicate(load_E, ranks, redundant), slots),
                                   (", no replicas", np.ones(load_E.size, dtype=np.int64),
                                    slots - redundant)):
        if current.slots_per_rank == slots:
            candidates["kept" + kind] = _padded(pack(load_E, replicas_E, ranks, held,
                                                     node_size, keep=current), slots)
        candidates["fresh" + kind] = _padded(pack(load_E, replicas_E, ranks, held, node_size),
                                             slots)
        if not redundant:
            break  # the same plans again
    if redundant:
        candidates["static, no replicas"] = _padded(static_placement(load_E.size, ranks), slots)
    scored = {}
    for name, placement in candidates.items():
        step = float(placement.rank_loads(load_E).max()) * seconds_per_pair + \
            placement.replicated() * seconds_per_replica
        moves = current.moves(placement) if placement.slots_per_rank == \
            current.slots_per_rank else sum(len(row) for row in placement.slots)
        scored[name] = {"step_s": step, "moves": moves,
                        "per_step_s": step + moves * seconds_per_move / steps_between,
                        "balancedness": placement.balancedness(load_E)}
    best = min(scored, key=lambda name: (scored[name]["per_step_s"], name != "current",
                                         scored[name]["moves"]))
    reason = "stay: no plan's gain beats its moves" if best == "current" else \
        f"{best}: {scored['current']['per_step_s'] / scored[best]['per_step_s']:.2f}x " \
        "predicted, moves included"
    return PlanChoice(candidates[best], reason, scored)


def _padded(placement: Placement, slots: int) -> Placement:
    """`placement` with EMPTY slots added up to `slots` a rank."""
    return Placement(tuple(row + (EMPTY,) * (slots - len(row)) for row in placement.slots),
                     placement.num_experts)


def initial_placement(num_experts: int, ranks: int, redundant: int) -> Placement:
    """The static placement plus `redundant` slots a rank holding the experts of the next ranks
    (rank w's extra slot i: expert i % n of rank w + 1 + i // n), before any load is known."""
    n = num_experts // ranks
    if redundant and (ranks < 2 or redundant > num_experts - n):
        raise ConfigError(f"{redundant} replica slots a rank need 2 or more ranks and at most "
                          f"{num_experts - n} (the experts a rank does not hold)")
    return Placement(tuple(
        tuple(range(w * n, (w + 1) * n)) + tuple(((w + 1 + i // n) % ranks) * n + i % n
                                                 for i in range(redundant))
        for w in range(ranks)), num_experts)


class PhysicalPairs:
    """A placement's tables on a device, and the mapping of one call's (token, choice) pairs
    from logical experts to physical slots (global physical id p = w * S + s).

    Pair (e, k), k its slot in logical expert e's buffer, goes to replica k mod r_e of e, in
    slot k // r_e there: each replica gets an even share of every rank's pairs, and the slots
    stay dense. A dropped pair (k >= limit) gets a physical slot >= limit, so the plans keep
    exactly the logical kept set, and the result is the unreplicated layer's."""

    def __init__(self, placement: Placement, device: torch.device) -> None:
        self.placement = placement
        slots = np.asarray(placement.slots)
        self.num_physical = slots.size
        replicas = placement.replicas()
        table = np.zeros((placement.num_experts, int(replicas.max())), dtype=np.int64)
        for e in range(placement.num_experts):
            holders = np.flatnonzero(slots.reshape(-1) == e)
            table[e, :holders.size] = holders
            table[e, holders.size:] = holders[0]
        self.replicas_host, self.table_host = replicas, table
        self.replicas_E = torch.from_numpy(replicas).to(device)
        self.table_EJ = torch.from_numpy(table).to(device)

    def pairs(self, expert_TK: torch.Tensor, slot_TK: torch.Tensor, limit: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(physical expert, physical slot, kept pairs per physical expert) of the pairs."""
        r_TK = self.replicas_E[expert_TK]
        phys_TK = self.table_EJ[expert_TK, slot_TK % r_TK]
        kept_TK = slot_TK < limit
        slot_TK = torch.where(kept_TK, slot_TK // r_TK, limit + slot_TK)
        counts_P = torch.zeros(self.num_physical, dtype=torch.int64, device=expert_TK.device)
        counts_P.scatter_add_(0, phys_TK.reshape(-1), kept_TK.reshape(-1).to(torch.int64))
        return phys_TK, slot_TK, counts_P

    def counts(self, counts: list[int], limit: int) -> list[int]:
        """Kept pairs per physical expert from the logical counts (host ints, no sync)."""
        out = [0] * self.num_physical
        for e, count in enumerate(counts):
            kept, r = min(count, limit), int(self.replicas_host[e])
            for j in range(r):
                out[int(self.table_host[e, j])] = max(0, -(-(kept - j) // r))
        return out
