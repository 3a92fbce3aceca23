"""The agreement record riding on the first dispatch (fixed capacity, calls that repeat).

Once two calls in a row agreed alike, every rank guesses the next call agrees alike too and
sends its record with its first dispatch instead of in an all-gather of its own. These tests
warm a layer until it rides, then change something on one rank or on all of them, and check
either the same typed error on every rank, or the result of a twin layer (same weights) that
swaps its record beforehand every call.
"""

from __future__ import annotations

import pytest
import torch

import schedmoe
from schedmoe.errors import InputError, StepError
from schedmoe.registry import register_gate
from schedmoe.routing import TopKRouter
from schedmoe.schedulers import AdaptiveScheduler, PipelineScheduler
from schedmoe.tools.testing import run_ranks

M, E, H, T = 8, 4, 16, 12


@register_gate("fails-when-told")
class GateThatFailsWhenTold(TopKRouter):
    fail = False

    def forward(self, x_TM):
        if self.fail:
            raise RuntimeError("gate told to fail")
        return super().forward(x_TM)


def _make(scheduler, **options):
    """A padded layer (ragged rows swap their split sizes before the dispatch every call)."""
    return schedmoe.MoELayer(M, E, H, 2, 1.25, scheduler=scheduler, ragged=False, **options)


def _pair(scheduler, **options):
    """A layer that may ride, and a twin with the same weights that never does."""
    torch.manual_seed(0)
    layer = _make(scheduler(), **options)
    torch.manual_seed(0)
    twin = _make(scheduler(), **options)
    twin._can_guess = lambda: False
    return layer, twin


def _warm(layer, x, twin=None, calls: int = 0) -> None:
    """Call at least `calls` times, until the next call rides (at most three calls more); the
    twin gets the same calls."""
    for i in range(calls + 3):
        if i >= calls and layer._can_guess():
            return
        layer(x)
        if twin is not None:
            twin(x)
    assert layer._can_guess(), "the layer never started guessing"


def _step(layer, x):
    """Forward and backward; the output, the input's gradient and the expert gradients."""
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = layer(x)
    (y.float().square().sum() + y.l_aux).backward()
    return (y.detach().float(), None if x.grad is None else x.grad.float(),
            [p.grad.clone() for p in layer.experts.parameters()], layer.last_stats.capacity)


def _same(got, want, what: str) -> None:
    y, gx, gp, cap = got
    y_want, gx_want, gp_want, cap_want = want
    assert cap == cap_want, (what, cap, cap_want)
    torch.testing.assert_close(y, y_want, rtol=1e-5, atol=1e-5, msg=what)
    assert (gx is None) == (gx_want is None), what
    if gx is not None:
        torch.testing.assert_close(gx, gx_want, rtol=1e-5, atol=1e-5, msg=what)
    for g, g_want in zip(gp, gp_want):
        torch.testing.assert_close(g, g_want, rtol=1e-5, atol=1e-5, msg=what)


SCHEDULERS = {
    "sequential": lambda: "sequential",
    "pipeline3": lambda: PipelineScheduler(3),
    "adaptive": lambda: AdaptiveScheduler(algorithms=("nccl", "2dh"), degrees=(1, 2),
                                          trial_steps=1, shortlist=2, drift=1e9),
}


def changes(rank: int, world: int, scheduler: str, options: dict) -> list[str]:
    """Every change the guess does not foresee, after warming: results equal the twin's."""
    layer, twin = _pair(SCHEDULERS[scheduler], **options)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(T, M, generator=gen).requires_grad_()
    cases = {
        "steady": x,
        "more tokens on rank 1": torch.randn(3 * T if rank == 1 else T, M, generator=gen),
        "fewer tokens everywhere": torch.randn(T // 2, M, generator=gen).requires_grad_(),
        "bf16 everywhere": torch.randn(T, M, generator=gen).bfloat16(),
        "input grad nowhere": torch.randn(T, M, generator=gen),
        "input grad on rank 0 only": torch.randn(T, M, generator=gen).requires_grad_(rank == 0),
        "no tokens on rank 1": torch.randn(0 if rank == 1 else T, M,
                                           generator=gen).requires_grad_(),
        "input grad on rank 1 after none": torch.randn(T, M, generator=gen).requires_grad_(
            rank == 1),
    }
    # the calls whose guess is wrong (a different C, dtype or input-grad state): run again
    misguessed = {"more tokens on rank 1", "fewer tokens everywhere", "bf16 everywhere",
                  "input grad nowhere", "input grad on rank 1 after none"}
    done = []
    for name, xi in cases.items():
        # the same call sequence for both: the adaptive schedulers decide alike
        if name.endswith("after none"):
            _warm(layer, x.detach(), twin, calls=2)
        else:
            _warm(layer, x, twin)
        _same(_step(layer, xi), _step(twin, xi), name)
        assert (layer._guess is None) == (name in misguessed), name
        done.append(name)
    if scheduler == "adaptive":  # a retry learns nothing twice
        got = [(d.step, d.reason) for d in layer.scheduler.decisions]
        want = [(d.step, d.reason) for d in twin.scheduler.decisions]
        assert got == want, (got, want)  # the winners may differ: they are timed
    return done


@pytest.mark.parametrize("scheduler,world,options", [
    ("sequential", 2, {}),
    ("pipeline3", 2, {"compressor": "zstd"}),
    ("adaptive", 2, {"compressor": "int8"}),
    ("sequential", 4, {"a2a": "2dh", "local_size": 2, "compressor": "bf16"}),
    ("pipeline3", 4, {"a2a": "pipe", "local_size": 2, "verify": True}),
])
def test_unforeseen_changes_give_the_twins_result(scheduler, world, options):
    results = run_ranks(changes, world, scheduler, options, timeout=300)
    assert all(len(done) == 8 for done in results)


def faults(rank: int, world: int, scheduler: str, options: dict) -> dict[str, tuple[str, str]]:
    torch.manual_seed(0)
    layer = _make(SCHEDULERS[scheduler](), gate="fails-when-told", **options)
    x = torch.randn(T, M, generator=torch.Generator().manual_seed(rank))
    mine = rank == 1
    cases = {
        "dtype f64 on one rank": lambda: layer(x.double() if mine else x),
        "dtype f16 vs bf16": lambda: layer(x.half() if mine else x.bfloat16()),
        "meta input on one rank": lambda: layer(x.to("meta") if mine else x),
        "no_grad on one rank": lambda: _no_grad_on(layer, x, mine),
        "non-tensor on one rank": lambda: layer(x.tolist() if mine else x),
        "wrong model dim on one rank": lambda: layer(x[:, :-1] if mine else x),
        "gate fails on one rank": lambda: _gate_fails_on(layer, x, mine),
        "after the faults": lambda: layer(x),
    }
    found = {}
    for name, case in cases.items():
        _warm(layer, x)
        try:
            case()
            found[name] = ("ok", "")
        except Exception as exc:  # noqa: BLE001 - the type is what the test checks
            found[name] = (type(exc).__name__, str(exc))
    return found


def _no_grad_on(layer, x, mine):
    with torch.set_grad_enabled(not mine):
        layer(x)


def _gate_fails_on(layer, x, mine):
    layer.gate.fail = mine
    try:
        layer(x)
    finally:
        layer.gate.fail = False


@pytest.mark.parametrize("scheduler,world,options", [
    ("sequential", 2, {}),
    ("pipeline3", 2, {"compressor": "int8"}),
    ("adaptive", 2, {"compressor": "zstd"}),
    ("sequential", 4, {"a2a": "pipe", "local_size": 2, "compressor": "fp8"}),
])
def test_faults_while_riding_raise_the_same_typed_error_on_every_rank(scheduler, world, options):
    expected = {
        "dtype f64 on one rank": (InputError.__name__, "dtype differs"),
        "dtype f16 vs bf16": (InputError.__name__, "dtype differs"),
        "meta input on one rank": (InputError.__name__, "'meta'"),
        "no_grad on one rank": (InputError.__name__, "autograd state"),
        "non-tensor on one rank": (InputError.__name__, "non-tensor"),
        "wrong model dim on one rank": (InputError.__name__, "model_dim"),
        "gate fails on one rank": (StepError.__name__, "gate told to fail"),
        "after the faults": ("ok", ""),
    }
    for rank, found in enumerate(run_ranks(faults, world, scheduler, options, timeout=300)):
        for name, (kind, fragment) in expected.items():
            assert found[name][0] == kind, (name, rank, found[name])
            assert fragment in found[name][1], (name, rank, found[name])


def rides(rank: int, world: int) -> list[bool]:
    """Which calls ride: a padded fixed-capacity layer after two alike calls; never in ragged
    rows (dropless or not), with error feedback or a scheduler that does not carry the record."""
    from schedmoe.schedulers.base import Scheduler

    class Plain(Scheduler):
        def run(self, x_WECM, ctx):
            return ctx.combine(ctx.run_experts(ctx.dispatch(x_WECM)))

    torch.manual_seed(0)
    layers = [schedmoe.MoELayer(M, E, H, 2, cf, scheduler=s, compressor=c, ragged=r)
              for cf, s, c, r in ((1.25, "sequential", "none", False),
                                  (0.0, "sequential", "none", False),
                                  (1.25, "sequential", "int8+ef", False),
                                  (1.25, Plain(), "none", False),
                                  (1.25, "sequential", "none", True))]
    x = torch.randn(T, M)
    seen = []
    for layer in layers:
        for _ in range(3):
            layer(x)
        seen.append(layer._can_guess())
    return seen


def test_which_layers_ride():
    assert run_ranks(rides, 2, timeout=120) == [[True, False, False, False, False]] * 2
