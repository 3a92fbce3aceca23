"""Inference with expert parallelism (issue 28): the no-grad path's collectives, and generation
in which every rank has its own prompts (hf.generate), against the unconverted model.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.distributed as dist

import schedmoe
from schedmoe import hf
from schedmoe.tools.testing import run_ranks

pytest.importorskip("transformers")

from hf_models import FAMILIES, tiny_model, token_ids  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all_single",
               "all_to_all", "broadcast", "reduce_scatter_tensor", "all_gather_object",
               "barrier")


class Count:
    """Counts the calls of torch.distributed's collectives while active."""

    def __enter__(self) -> Counter:
        self.seen, self.saved = Counter(), {}
        for name in COLLECTIVES:
            original = getattr(dist, name)
            self.saved[name] = original

            def counted(*args, _name=name, _original=original, **kwargs):
                self.seen[_name] += 1
                return _original(*args, **kwargs)
            setattr(dist, name, counted)
        return self.seen

    def __exit__(self, *exc) -> None:
        for name, original in self.saved.items():
            setattr(dist, name, original)


def _collectives(rank: int, world: int) -> dict:
    """Collectives per call of a dropless layer with the "global" balance loss, after two
    warm-up calls: in training, under no_grad in eval mode, under inference_mode, and under
    no_grad in training mode (a reentrant activation checkpoint's forward: the full path)."""
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(8, 4, 16, capacity_factor=0.0, balance_loss="global",
                              balance_group=dist.group.WORLD, scheduler="adaptive")
    x = torch.randn(6 + rank, 8, generator=torch.Generator().manual_seed(rank))
    out = {}
    for mode in ("train", "no_grad eval", "inference_mode", "no_grad train"):
        layer.train(mode.endswith("train"))
        context = (torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
                   if mode.startswith("no_grad") else torch.enable_grad())
        with context:
            for _ in range(2):
                layer(x)
            decisions = len(layer.scheduler.decisions)
            with Count() as seen:
                y = layer(x)
        out[mode] = {"collectives": dict(seen), "aux": float(y.l_aux),
                     "timed": bool(layer.last_stats.op_ms),
                     "tuned": len(layer.scheduler.decisions) > decisions}
    return out


def test_the_no_grad_path_makes_only_the_agreement_and_the_exchanges():
    for out in run_ranks(_collectives, 2):
        for mode in ("no_grad eval", "inference_mode"):
            quiet = out[mode]
            assert quiet["collectives"] == {"all_gather": 1, "all_to_all_single": 2}, (mode,
                                                                                       quiet)
            assert quiet["aux"] == 0.0 and not quiet["timed"], (mode, quiet)
        for mode in ("train", "no_grad train"):  # the full path: the balance loss all-reduces
            full = out[mode]
            assert full["collectives"].get("all_reduce", 0) >= 1, (mode, full)
            assert full["aux"] > 0.0 and full["timed"], (mode, full)
        assert out["train"]["tuned"] and not out["no_grad eval"]["tuned"]


def _uneven(rank: int, world: int, families: list[str]) -> dict[str, bool]:
    """Each rank generates for its own prompts: lengths and batch sizes differ by rank, rank 1
    stops 10 tokens before the others, the last rank has no prompts at all; every rank's tokens
    against the unconverted model's on the same prompts."""
    out = {}
    for family in families:
        reference = tiny_model(family)
        converted = hf.convert(copy.deepcopy(reference))
        ids = None if rank == world - 1 else token_ids(rank, batch=1 + rank % 2,
                                                       length=4 + 3 * rank)
        steps = dict(max_new_tokens=4 if rank == 1 else 14, do_sample=False)
        got = hf.generate(converted, ids, **steps)
        if ids is None:
            out[family] = got is None
        else:
            with torch.no_grad():
                want = reference.generate(ids, **steps)
            out[family] = torch.equal(got, want)
    return out


@pytest.mark.parametrize("world,families", [(2, list(FAMILIES)),
                                            (4, ["mixtral", "deepseek_v3"])])
def test_generation_with_uneven_ranks_equals_the_unconverted_model(world, families):
    for rank, out in enumerate(run_ranks(_uneven, world, families, timeout=300)):
        assert out == {family: True for family in families}, (rank, out)
