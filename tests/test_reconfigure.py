"""Options changed at run time: re-read at the next call and checked by the agreement there.

A change on one rank raises ConfigMismatchError on every rank at the next call (never an abort
or a timeout), whether that call agrees in an all-gather (dropless) or its record rides on the
dispatch (padded, fixed capacity, after warming); undoing the change makes the next call equal
a clean layer's. A change on every rank alike takes effect at the next call, which equals a
layer built with the new options; a change to an option that shapes the parameters raises on
every rank.
"""

from __future__ import annotations

import pytest
import torch

import schedmoe
from schedmoe.errors import ConfigMismatchError, StepError
from schedmoe.ops.codecs.codec_set import CodecSet
from schedmoe.schedulers import PipelineScheduler
from schedmoe.tools.testing import run_ranks

M, E, H, T = 8, 4, 16, 12
PATHS = {"dropless": {"capacity_factor": 0.0},  # an all-gather every call
         "riding": {"capacity_factor": 1.25, "ragged": False}}  # the record rides, once warm


def _build(path: str, **changes) -> schedmoe.MoELayer:
    torch.manual_seed(0)
    options = {"scheduler": PipelineScheduler(2), **PATHS[path], **changes}
    return schedmoe.MoELayer(M, E, H, 2, **options)


def _set(obj, name, value):
    setattr(obj, name, value)


# name -> (change, undo, what the error names); the change is made on rank 1 only
ONE_RANK = {
    "layer.scheduler": (lambda l: _set(l, "scheduler", PipelineScheduler(3)),
                        lambda l: _set(l, "scheduler", PipelineScheduler(2)), "scheduler differs"),
    "scheduler in place": (lambda l: _set(l.scheduler, "degree", 3),
                           lambda l: _set(l.scheduler, "degree", 2), "scheduler differs"),
    "layer.codecs": (lambda l: _set(l, "codecs", CodecSet.build("bf16")),
                     lambda l: _set(l, "codecs", CodecSet.build("none")), "compressor differs"),
    "config.compressor": (lambda l: _set(l.config, "compressor", "fp16"),
                          lambda l: _set(l.config, "compressor", "none"), "compressor differs"),
    "config.scheduler": (lambda l: _set(l.config, "scheduler", "sequential"),
                         lambda l: _set(l.config, "scheduler", PipelineScheduler(2)),
                         "scheduler differs"),
    "config.capacity_factor": (lambda l: _set(l.config, "capacity_factor", 2.0),
                               None, "capacity_factor differs"),
    "config.drop_policy": (lambda l: _set(l.config, "drop_policy", "probability"),
                           lambda l: _set(l.config, "drop_policy", "position"),
                           "drop_policy differs"),
    "a2a in place": (lambda l: _set(l.a2a, "local_size", 1),
                     lambda l: _set(l.a2a, "local_size", None), "local_size differs"),
    "config.top_k (fixed)": (lambda l: _set(l.config, "top_k", 1),
                             lambda l: _set(l.config, "top_k", 2), "top_k differs"),
}


def _warm(layer, x) -> None:
    for _ in range(3):
        layer(x)
    assert layer._can_guess() == (layer.config.capacity_factor > 0)


def changed_on_one_rank(rank: int, world: int, path: str) -> dict:
    layer, clean = _build(path), _build(path)
    x = torch.randn(T, M, generator=torch.Generator().manual_seed(rank))
    cf = layer.config.capacity_factor
    found = {}
    for name, (change, undo, _) in ONE_RANK.items():
        _warm(layer, x)
        if rank == 1:
            change(layer)
        try:
            layer(x)
            found[name] = ("ok", "")
        except Exception as exc:
            found[name] = (type(exc).__name__, str(exc))
        if rank == 1:  # undo: the next call is a clean layer's
            (undo or (lambda l: _set(l.config, "capacity_factor", cf)))(layer)
        torch.testing.assert_close(layer(x), clean(x), msg=f"after {name}")
    return found


@pytest.mark.parametrize("path", list(PATHS))
def test_a_change_on_one_rank_raises_on_every_rank(path):
    for rank, found in enumerate(run_ranks(changed_on_one_rank, 2, path, timeout=120)):
        for name, (_, _, fragment) in ONE_RANK.items():
            kind, message = found[name]
            assert kind == ConfigMismatchError.__name__, (path, name, rank, found[name])
            assert fragment in message, (path, name, rank, message)


def changed_everywhere(rank: int, world: int, path: str) -> dict:
    x = torch.randn(T, M, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    cases = {"capacity_factor": 0.0 if path == "riding" else 1.5,
             "scheduler": PipelineScheduler(3), "compressor": "bf16", "a2a": "pipe"}
    for name, value in cases.items():
        layer = _build(path)
        _warm(layer, x)
        if name == "scheduler":
            layer.scheduler = value
        else:
            setattr(layer.config, name, value)
        want = _build(path, **{name: value})
        for _ in range(2):  # the first call after the change and one after it
            y, y_want = layer(x), want(x)
            torch.testing.assert_close(y, y_want, msg=name)
            g, = torch.autograd.grad(y.square().sum(), x)
            g_want, = torch.autograd.grad(y_want.square().sum(), x)
            torch.testing.assert_close(g, g_want, msg=name)
        assert layer.scheduler.describe() == want.scheduler.describe()
        assert layer.codecs.describe() == want.codecs.describe()
    # an option that shapes the parameters, changed everywhere: the typed error on every rank,
    # and the layer works again once it is undone
    layer = _build(path)
    _warm(layer, x)
    layer.config.hidden_dim = 2 * H
    try:
        layer(x)
        refused = ("ok", "")
    except Exception as exc:
        refused = (type(exc).__name__, str(exc))
    layer.config.hidden_dim = H
    torch.testing.assert_close(layer(x), _build(path)(x))
    return refused


@pytest.mark.parametrize("path", list(PATHS))
def test_a_change_on_every_rank_takes_effect_at_the_next_call(path):
    for kind, message in run_ranks(changed_everywhere, 2, path, timeout=120):
        assert kind == StepError.__name__, message
        assert "hidden_dim cannot change once the layer is built" in message
