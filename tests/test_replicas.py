"""Replica slots (MoELayer(redundant_slots=R), plan/placement.py, ops/experts/replicas.py):
every (token, expert) pair goes to one replica of its expert, and the layer equals the
unreplicated one (outputs, input and gate gradients, and each expert's gradient once summed
over its replicas) under random placements, replicas on the same and on other nodes; training
with re-placement equals training without."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

import schedmoe
from schedmoe.errors import CheckpointError, ConfigError
from schedmoe.ops import is_expert_parameter
from schedmoe.plan.placement import Placement, pack, plan_placement, replicate
from schedmoe.tools.testing import run_ranks

M, E, H, T = 8, 8, 16, 24


def _twins(options: dict, redundant: int) -> tuple[schedmoe.MoELayer, schedmoe.MoELayer]:
    torch.manual_seed(0)
    plain = schedmoe.MoELayer(M, E, H, **options)
    torch.manual_seed(0)
    replicated = schedmoe.MoELayer(M, E, H, redundant_slots=redundant, **options)
    return plain, replicated


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _logical(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `[E / W, ...]` rows gathered: the logical experts in order."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _random_placement(world: int, redundant: int, seed: int) -> Placement:
    load = np.random.default_rng(seed).pareto(1.0, E) + 0.1
    node = 2 if seed % 2 else None  # replicas kept within nodes of 2, or anywhere
    return pack(load, replicate(load, world, redundant), world, E // world + redundant, node)


CASES = [(scheduler, codec, a2a, layout)
         for scheduler in ("sequential", "pipeline", "adaptive")
         for codec in ("none", "bf16", "int8", "fp8", "zstd")
         for a2a in ("nccl", "2dh", "pipe", "staged")
         for layout in ({"capacity_factor": 1.0, "ragged": False}, {"capacity_factor": 0.0})]


def _exact(rank: int, world: int, redundant: int) -> list[tuple]:
    found = []
    for i, (scheduler, codec, a2a, layout) in enumerate(CASES):
        options = dict(scheduler=scheduler, compressor=codec, a2a=a2a, local_size=2, **layout)
        plain, replicated = _twins(options, redundant)
        replicated.place(_random_placement(world, redundant, seed=i))
        gen = torch.Generator().manual_seed(100 * rank + i)
        for _ in range(2):  # an adaptive layer profiles: two calls
            x = torch.randn(T, M, generator=gen) * 2
            xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
            ys = [plain(xs[0]), replicated(xs[1])]
            for y in ys:
                y.square().sum().backward()
        replicated.sync_replica_grads()
        errors = [_rel(ys[1], ys[0]), _rel(xs[1].grad, xs[0].grad),
                  _rel(replicated.gate.wg_EM.grad, plain.gate.wg_EM.grad)]
        slots = torch.tensor(replicated.placement.slots[rank])
        for p, q in zip(plain.experts.parameters(), replicated.experts.parameters()):
            # each slot: its logical expert's weights and its whole gradient
            errors += [_rel(q.grad, _logical(p.grad)[slots]),
                       _rel(q.detach(), _logical(p.detach())[slots])]
        stats = [plain.last_stats.counts == replicated.last_stats.counts,
                 plain.last_stats.dropped == replicated.last_stats.dropped]
        found.append(((scheduler, codec, a2a, str(layout)), max(errors), all(stats)))
    return found


@pytest.mark.parametrize("world,redundant", [(2, 1), (4, 2)])
def test_replicated_layer_equals_the_unreplicated_one(world, redundant):
    for results in run_ranks(_exact, world, redundant, timeout=600):
        for case, error, same_stats in results:
            assert error <= 1e-5, (case, error)
            assert same_stats, case


def _train(rank: int, world: int, redundant: int, every: int) -> tuple[list[float], list, int]:
    """20 AdamW steps; with replica slots, re-placed every `every` steps from the load."""
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(M, E, H, capacity_factor=0.0, redundant_slots=redundant,
                              scheduler="pipeline")
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    losses, placements = [], {layer.placement}
    for step in range(20):
        x = torch.randn(T, M, generator=torch.Generator().manual_seed(1000 * step + rank)) * 2
        loss = layer(x).square().mean()
        opt.zero_grad()
        loss.backward()
        layer.sync_replica_grads()
        for p in layer.parameters():  # data parallel over the ranks: the average
            if p.grad is not None and not is_expert_parameter(p):
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        losses.append(float(loss.detach()))
        if redundant and (step + 1) % every == 0:
            load = schedmoe.parallel.expert_load(torch.nn.Sequential(layer))["0"].tokens
            choice = plan_placement(np.asarray(load), world, redundant,
                                    current=layer.placement, seconds_per_move=0.0)
            layer.place(choice.placement, opt)
            placements.add(layer.placement)
    slots = [e for row in layer.placement.slots for e in row]  # every rank's, in rank order
    every = _logical(layer.experts.w1_EMH.detach())  # every slot of every rank
    logical = torch.stack([every[slots.index(e)] for e in range(E)])  # first holder of each
    return losses, logical.tolist(), len(placements)


def test_training_with_replacement_equals_training_without():
    plain = run_ranks(_train, 2, 0, 5)
    moved = run_ranks(_train, 2, 1, 5)
    for (losses_a, weights_a, _), (losses_b, weights_b, placements) in zip(plain, moved):
        assert placements >= 2  # the experts did move
        np.testing.assert_allclose(losses_b, losses_a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(weights_b, weights_a, rtol=1e-5, atol=1e-6)


def _misuse(rank: int, world: int) -> list[str]:
    said = []
    layer = schedmoe.MoELayer(M, E, H, redundant_slots=1)
    for bad in (Placement(((0, 1, 2, 3, 4),) * 2, E),  # experts 5-7 held nowhere
                Placement(((0, 1, 2, 3),) * 2, E),  # too few slots
                Placement(((0, 1, 2, 3, 9), (4, 5, 6, 7, 0)), E)):  # no expert 9
        try:
            layer.place(bad)
        except ConfigError as exc:
            said.append("placement" if "placement" in str(exc) else str(exc))
    try:
        layer.state_dict()
    except CheckpointError as exc:
        said.append("state dict" if "replica slots" in str(exc) else str(exc))
    return said


def test_misuse_is_refused_on_every_rank():
    assert run_ranks(_misuse, 2) == [["placement"] * 3 + ["state dict"]] * 2
    with pytest.raises(ConfigError, match="redundant_slots"):
        schedmoe.MoELayer(M, E, H, redundant_slots=1)  # one rank: nowhere to replicate


def _planned_without_replicas(rank: int, world: int) -> list[float]:
    """A planned placement without replica slots (experts moved between ranks) equals the
    static layer too."""
    plain, placed = _twins({"capacity_factor": 0.0, "scheduler": "pipeline"}, 0)
    placed.place(Placement(((7, 0, 5, 2), (1, 6, 3, 4)), E))
    assert placed.placed and not plain.placed
    x = torch.randn(T, M, generator=torch.Generator().manual_seed(rank))
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ys = [plain(xs[0]), placed(xs[1])]
    for y in ys:
        y.square().sum().backward()
    slots = torch.tensor(placed.placement.slots[rank])
    return [_rel(ys[1], ys[0]), _rel(xs[1].grad, xs[0].grad)] + [
        _rel(q.grad, _logical(p.grad)[slots])
        for p, q in zip(plain.experts.parameters(), placed.experts.parameters())]


def test_a_planned_placement_without_replicas_equals_the_static_one():
    for errors in run_ranks(_planned_without_replicas, 2):
        assert max(errors) <= 1e-5, errors


def _rebalance(rank: int, world: int) -> tuple[float, float, str]:
    """A router biased towards experts 0 and 1 (both on rank 0): rebalance with a replica slot
    a rank evens the ranks' load."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(schedmoe.MoELayer(M, E, H, capacity_factor=0.0,
                                                  redundant_slots=1,
                                                  gate_options={"bias": True}))
    with torch.no_grad():
        model[0].gate.bias_E[:2] = 2.0
    x = torch.randn(64, M, generator=torch.Generator().manual_seed(rank))
    model(x)
    before = schedmoe.parallel.expert_load(model)["0"].balancedness
    choice = schedmoe.parallel.rebalance(model)["0"]
    model[0].load.reset()
    model(x)
    after = schedmoe.parallel.expert_load(model)["0"].balancedness
    return before, after, choice.reason


def test_rebalance_evens_a_skewed_load():
    for before, after, reason in run_ranks(_rebalance, 2):
        assert before < 0.8 and after >= 0.9, (before, after, reason)
        assert not reason.startswith("stay")
