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


def _in_slots(logical: torch.Tensor, row: tuple[int, ...]) -> torch.Tensor:
    """The rows of `logical` [E, ...] a rank's slots hold; zeros for an empty slot (-1)."""
    out = logical[torch.tensor([max(e, 0) for e in row])]
    out[torch.tensor([e < 0 for e in row])] = 0
    return out


def _random_placement(world: int, redundant: int, seed: int) -> Placement:
    """Replicas kept within nodes of 2 or anywhere; every third seed, a replica slot a rank
    left empty."""
    load = np.random.default_rng(seed).pareto(1.0, E) + 0.1
    node = 2 if seed % 2 else None
    replicas = replicate(load, world, redundant - (seed % 3 == 0))
    return pack(load, replicas, world, E // world + redundant, node)


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
        slots = replicated.placement.slots[rank]
        for p, q in zip(plain.experts.parameters(), replicated.experts.parameters()):
            # each slot: its logical expert's weights and its whole gradient; zeros if empty
            errors += [_rel(q.grad, _in_slots(_logical(p.grad), slots)),
                       _rel(q.detach(), _in_slots(_logical(p.detach()), slots))]
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
    mine = layer.state_dict()  # this rank's slots, one of them a replica of the other's
    other = schedmoe.MoELayer(M, E, H, redundant_slots=1)
    other.place(Placement(((4, 5, 6, 7, 0), (0, 1, 2, 3, 4)), E))  # needs experts it lacks
    try:
        other.load_state_dict(mine)
    except CheckpointError as exc:
        said.append("state dict" if "are not there" in str(exc) else str(exc))
    return said


def test_misuse_is_refused_on_every_rank():
    assert run_ranks(_misuse, 2) == [["placement"] * 3 + ["state dict"]] * 2
    with pytest.raises(ConfigError, match="redundant_slots"):
        schedmoe.MoELayer(M, E, H, redundant_slots=1)  # one rank: nowhere to replicate


def _plain_state_dicts(rank: int, world: int) -> list[float]:
    """A placed layer's plain state dicts: `full_state_dict` gathers its slots back into the
    logical experts (the unplaced twin's), which load into a layer under another placement;
    its own state dict (its slots) loads into a layer of the same placement."""
    plain, placed = _twins({"capacity_factor": 0.0}, 1)
    placed.place(_random_placement(world, 1, seed=3))
    full = schedmoe.parallel.full_state_dict(placed)
    errors = [_rel(full[f"experts.{name}"], _logical(p.detach()))
              for name, p in plain.experts.named_parameters()]
    torch.manual_seed(9)
    other = schedmoe.MoELayer(M, E, H, capacity_factor=0.0, redundant_slots=2)
    other.place(_random_placement(world, 2, seed=4))
    other.load_state_dict(full)
    again = schedmoe.MoELayer(M, E, H, capacity_factor=0.0, redundant_slots=1)
    again.place(placed.placement)
    again.load_state_dict(placed.state_dict())
    x = torch.randn(T, M, generator=torch.Generator().manual_seed(rank))
    y = plain(x)
    return errors + [_rel(other(x), y), _rel(again(x), y)]


def test_plain_state_dicts_of_placed_layers_are_in_logical_form():
    for errors in run_ranks(_plain_state_dicts, 2):
        assert max(errors) <= 1e-6, errors


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


# -- checkpoints of placed layers: logical-expert form -----------------------------------------

def _dp_step(wrapped, opt, layout, index: int) -> float:
    """One AdamW step of the DDP recipe on global batch `index` (replica gradients summed
    before clipping); the global loss."""
    from schedmoe.tools.train.data import CharCorpus, shard
    from schedmoe.tools.train.model import lm_loss
    from test_parallel import AUX, BATCH, SEQ
    x, y = (shard(t, dist.get_rank(), dist.get_world_size())
            for t in CharCorpus().batch(index, BATCH, SEQ))
    opt.zero_grad()
    loss, ce, _ = lm_loss(wrapped, x, y, AUX)
    loss.backward()
    schedmoe.parallel.sync_replica_grads(wrapped)
    schedmoe.parallel.clip_grad_norm_(wrapped, 0.5, layout)
    opt.step()
    total = ce.detach().clone()
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


def _logical_state(model, opt, layout) -> dict[str, torch.Tensor]:
    """Every expert parameter and its AdamW moments as [E, ...] in expert order, read off
    each layer's slots (gathered over its EP group, each expert from its first holder), and
    the dense parameters: written here, apart from schedmoe's logical form."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, schedmoe.MoELayer):
            continue
        slots = [e for row in module.placement.slots for e in row]
        first = [slots.index(e) for e in range(module.config.num_experts)]
        for pname, p in module.experts.named_parameters():
            for what, t in [("", p), *opt.state[p].items()]:
                if t.dim():
                    parts = [torch.empty_like(t) for _ in range(layout.ep_size)]
                    dist.all_gather(parts, t.detach().contiguous(), group=layout.ep_group)
                    out[f"{name}.{pname}:{what}"] = torch.cat(parts)[first]
    for name, p in model.named_parameters():
        if not getattr(p, "expert", False):
            out[name.removeprefix("module.")] = p.detach().clone()
    return out


def _placed_checkpoints(rank: int, world: int, root: str) -> dict:
    """Trained with the DDP recipe at EP 2 (x EDP 2) with replica slots and planned
    placements, saved; the same model without placements as the reference; the checkpoint
    loaded at EP 4 under other placements and more replica slots, and at EP 2 static."""
    from test_parallel import LR, build
    par = schedmoe.parallel
    out = {}
    for redundant in (0, 1):
        layout = par.init_parallel(2)
        model = build(layout, redundant_slots=redundant)
        if redundant:
            for i, block in enumerate(model.blocks):
                block.moe.place(_random_placement(2, redundant, seed=i + 1))
            try:
                par.fully_shard_moe(build(layout, redundant_slots=redundant), layout)
            except ConfigError as exc:
                out["fsdp"] = "data_parallel" in str(exc)
        wrapped = par.data_parallel(model, layout)
        opt = torch.optim.AdamW(wrapped.parameters(), lr=LR)
        losses = [_dp_step(wrapped, opt, layout, i) for i in range(2)]
        if redundant:
            par.save_checkpoint(f"{root}/placed", wrapped, opt, layout)
        out[redundant] = {"losses": losses, "state": _logical_state(model, opt, layout),
                          "full": par.full_state_dict(wrapped),
                          "next": _dp_step(wrapped, opt, layout, 2)}
    for ep_size, redundant in ((4, 2), (2, 0)):
        layout = par.init_parallel(ep_size)
        model = build(layout, seed=5, redundant_slots=redundant)
        if redundant:
            for i, block in enumerate(model.blocks):
                block.moe.place(_random_placement(ep_size, redundant, seed=i + 7))
        wrapped = par.data_parallel(model, layout)
        opt = torch.optim.AdamW(wrapped.parameters(), lr=LR)
        _dp_step(wrapped, opt, layout, 5)  # optimizer state to overwrite
        par.load_checkpoint(f"{root}/placed", wrapped, opt, layout)
        out[ep_size, redundant] = {"state": _logical_state(model, opt, layout),
                                   "next": _dp_step(wrapped, opt, layout, 2)}
    return out


def test_checkpoints_of_placed_layers_load_under_another_placement_and_ep_size(tmp_path):
    from test_parallel import key_bias_free
    for out in run_ranks(_placed_checkpoints, 4, str(tmp_path), timeout=300):
        assert out["fsdp"], "FSDP2 must refuse replica slots"
        plain, placed = out[0], out[1]
        np.testing.assert_allclose(placed["losses"], plain["losses"], rtol=1e-5)
        for key, value in plain["full"].items():  # logical form = the unplaced model's
            ours, ref = key_bias_free(key, placed["full"][key]), key_bias_free(key, value)
            torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-5, atol=1e-6,
                                       msg=key)
        for where in ((4, 2), (2, 0)):
            loaded = out[where]
            assert loaded["state"].keys() == placed["state"].keys(), where
            for key, value in placed["state"].items():  # weights and moments, exactly
                assert torch.equal(loaded["state"][key], value), (where, key)
            assert abs(loaded["next"] - placed["next"]) <= 1e-6 * placed["next"], where
