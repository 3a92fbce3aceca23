"""The adaptive scheduler: exact results, identical decisions on every rank, re-tuning."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import schedmoe
from schedmoe.errors import ConfigError
from schedmoe.schedulers import AdaptiveScheduler
from schedmoe.tools.testing import run_ranks

M, E, H = 16, 8, 24


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def make(scheduler, **options):
    torch.manual_seed(5)
    return schedmoe.MoELayer(M, E, H, top_k=2, capacity_factor=1.3, local_size=2,
                             scheduler=scheduler, **options)


def run_steps(rank: int, world: int, steps: int):
    adaptive = AdaptiveScheduler(degrees=(1, 2, 3, 4, 8), codecs=("none", "zstd"),
                                 shortlist=2, trial_steps=2, check_every=2)
    layer, reference = make(adaptive), make("sequential")
    for step in range(steps):
        x = torch.randn(11 + 4 * rank + step, M,
                        generator=torch.Generator().manual_seed(step * 10 + rank))
        results = []
        for model in (layer, reference):
            xi = x.clone().requires_grad_()
            y = model(xi)
            (y * torch.sin(torch.arange(M, dtype=torch.float32))).sum().backward()
            results.append([y.detach(), xi.grad] + [p.grad.clone() for p in model.parameters()])
            model.zero_grad()
        errors = [rel(a, b) for a, b in zip(*results)]
        assert max(errors) <= 1e-6, (step, layer.last_stats.schedule, errors)
    return [(d.step, d.reason, d.algorithm, d.codec, d.degree, d.predicted_ms)
            for d in adaptive.decisions], adaptive.decisions[-1].measured_ms


def test_adaptive_is_exact_and_ranks_agree():
    results = run_ranks(run_steps, 4, 20, timeout=300)
    decisions = [r[0] for r in results]
    assert all(d == decisions[0] for d in decisions), "ranks chose different schedules"
    reasons = [d[1] for d in decisions[0]]
    # 3 algorithms x 2 codecs x degrees (1, 4), then the 2 best predictions tried for 2 steps
    assert reasons[:15] == ["profile"] * 12 + ["trial"] * 2 + ["tuned"]
    trials, tuned = decisions[0][12:14], decisions[0][14]
    assert trials[0][5] <= trials[1][5]  # tried in order of prediction
    assert len({round(math.log2(t[4])) for t in trials}) == 2  # from different degree bands
    assert tuned[2:5] in [t[2:5] for t in trials] and tuned[5] > 0
    assert results[0][1], "the winner's step times were measured"


def test_capacity_bucket_change_retunes():
    adaptive = AdaptiveScheduler(degrees=(1, 2), algorithms=("nccl",), shortlist=1,
                                 trial_steps=1, check_every=100)
    layer = make(adaptive)
    for tokens in [60] * 4 + [500] * 2:  # capacity 20 (bucket 0), then 163 (bucket 1)
        layer(torch.randn(tokens, M)).sum().backward()
    assert [d.reason for d in adaptive.decisions] == ["profile", "profile", "trial", "tuned",
                                                      "trial", "bucket"]
    assert layer.last_stats.schedule["reason"] == "bucket"


def test_drift_restarts_profiling():
    ticks = itertools.count()  # every step 1 ms longer than the one before: a sure drift
    adaptive = AdaptiveScheduler(degrees=(1, 2), algorithms=("nccl",), shortlist=1,
                                 trial_steps=1, check_every=1, drift=0.0,
                                 timer=lambda: 0.0005 * next(ticks) ** 2)
    layer = make(adaptive)
    for _ in range(8):
        layer(torch.randn(40, M)).sum().backward()
    reasons = [d.reason for d in adaptive.decisions]
    assert reasons[:5] == ["profile", "profile", "trial", "tuned", "drift"]  # two checks over
    assert len(adaptive.decisions[3].measured_ms) >= 3  # the measurements that triggered it


def test_lossy_codecs_need_permission():
    with pytest.raises(ConfigError, match="allow_lossy"):
        AdaptiveScheduler(codecs=("none", "int8"))
    assert AdaptiveScheduler(codecs=("none", "int8"), allow_lossy=True).codecs == ("none", "int8")


def clocked_training(rank: int, world: int, steps: int, micro_batches: int) -> dict:
    """Three adaptive layers ticked by one StepClock on the optimizer, gradient accumulation
    over `micro_batches`; the same model with sequential layers trained alike as reference."""
    from schedmoe.schedulers import StepClock

    def model(scheduler):
        torch.manual_seed(3)
        return torch.nn.Sequential(*[schedmoe.MoELayer(M, E, H, 2, 1.3, scheduler=scheduler())
                                     for _ in range(3)])

    adaptive = model(lambda: AdaptiveScheduler(degrees=(1, 2), algorithms=("nccl", "pipe"),
                                               shortlist=2, trial_steps=2, check_every=100))
    reference = model(lambda: "sequential")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (adaptive, reference)]
    clock = StepClock.attach(adaptive, optimizers[0])
    reasons = []  # per step, per layer: the reason of each micro-batch's decision
    for step in range(steps):
        seen = [[] for _ in range(3)]
        for micro in range(micro_batches):
            x = torch.randn(20 + rank, M, generator=torch.Generator().manual_seed(
                100 * step + 10 * micro + rank))
            for net in (adaptive, reference):
                (net(x).square().mean() / micro_batches).backward()
            for i, layer in enumerate(adaptive):
                seen[i].append((layer.last_stats.schedule["reason"],
                                layer.last_stats.schedule["degree"]))
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        reasons.append(seen)
    for a, b in zip(adaptive.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert clock.steps == steps
    return {"reasons": reasons,
            "decisions": [[(d.step, d.reason, d.algorithm, d.degree, len(d.measured_ms))
                           for d in layer.scheduler.decisions] for layer in adaptive]}


def test_step_clock_tunes_layers_one_at_a_time_per_optimizer_step():
    results = run_ranks(clocked_training, 2, 26, 2, timeout=300)
    assert results[0] == results[1], "ranks decided differently"
    reasons, decisions = results[0]["reasons"], results[0]["decisions"]
    for step, layers in enumerate(reasons):
        for micro_batches in layers:  # every micro-batch of a step runs the same decision
            assert len(set(micro_batches)) == 1, (step, micro_batches)
        tuning = [i for i, mb in enumerate(layers) if mb[0][0] in ("profile", "trial")]
        assert len(tuning) <= 1, f"step {step}: layers {tuning} tune at once"
    # 2 algorithms x 2 degrees profiled, 2 candidates x 2 trial steps, then tuned: 8 steps a
    # layer, in model order, the others holding meanwhile (a layer's steps count its holds)
    for layer, found in enumerate(decisions):
        assert [d[1] for d in found] == ["profile"] * 4 + ["trial"] * 2 + ["tuned"], found
        assert [d[0] for d in found] == [8 * layer + s for s in (1, 2, 3, 4, 5, 5, 9)]
        assert [d[4] for d in found[4:6]] == [2, 2], "each trial step timed by the clock"
        holds = [step for step, layers in enumerate(reasons) if layers[layer][0][0] == "hold"]
        assert holds == list(range(8 * layer)), holds  # held until its turn, never after
    assert [mb[0][0] for mb in reasons[-1]] == ["tuned"] * 3


@pytest.mark.parametrize("period", [1, 5])  # shorter than one bucket's trials (6 calls)
def test_the_tuner_settles_when_capacity_alternates_between_buckets(period):
    """Dropless-like capacities alternating between two buckets: each bucket runs its own
    trials once (at most buckets x shortlist x trial_steps trial calls), then every call runs
    a tuned decision."""
    shortlist, trial_steps = 2, 3
    adaptive = AdaptiveScheduler(degrees=(1, 2), algorithms=("nccl",), shortlist=shortlist,
                                 trial_steps=trial_steps, check_every=1000)
    layer = make(adaptive)
    reasons = []
    for call in range(120):
        tokens = 60 if (call // period) % 2 == 0 else 500  # buckets 0 and 1
        layer(torch.randn(tokens, M)).sum().backward()
        reasons.append(layer.last_stats.schedule["reason"])
    assert reasons[:2] == ["profile", "profile"]
    assert reasons.count("trial") <= 2 * shortlist * trial_steps
    last_trial = max(i for i, r in enumerate(reasons) if r == "trial")
    assert last_trial < 2 + 2 * (shortlist * trial_steps + 1) * period
    assert set(reasons[last_trial + 1:]) <= {"tuned", "bucket"}
    assert set(adaptive._winners) == {0, 1}
