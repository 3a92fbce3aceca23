"""Every scheduler gives the sequential schedule's outputs and gradients."""

from __future__ import annotations

import pytest
import torch

import schedmoe
from schedmoe.errors import ConfigError
from schedmoe.schedulers import PipelineScheduler
from schedmoe.plan.layout import chunk_bounds
from schedmoe.tools.testing import run_ranks

M, E, H = 16, 8, 24
DEGREES = [1, 2, 3, 4, 8]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def step(rank: int, scheduler, a2a: str, codec: str, tokens: int):
    torch.manual_seed(11)
    layer = schedmoe.MoELayer(M, E, H, top_k=2, capacity_factor=1.3, a2a=a2a, local_size=2,
                              compressor=codec, scheduler=scheduler)
    x = torch.randn(tokens, M, generator=torch.Generator().manual_seed(100 + rank))
    x.requires_grad_()
    y = layer(x)
    (y * torch.cos(torch.arange(M, dtype=torch.float32))).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in layer.parameters()], layer.last_stats


def compare_schedulers(rank: int, world: int) -> list[int]:
    tokens = 13 + 6 * rank  # unequal token counts: capacities differ per rank before the MAX
    capacities = []
    for a2a in ("nccl", "2dh", "pipe"):
        for codec in ("none", "zstd"):
            reference, stats = step(rank, "sequential", a2a, codec, tokens)
            capacities.append(stats.capacity)
            for degree in DEGREES:
                got, _ = step(rank, PipelineScheduler(degree), a2a, codec, tokens)
                errors = [rel(g, r) for g, r in zip(got, reference)]
                assert max(errors) <= 1e-6, (a2a, codec, degree, errors)
    return capacities


def test_pipeline_matches_sequential_on_4_ranks():
    capacities = run_ranks(compare_schedulers, 4, timeout=300)[0]
    # the test only covers unequal chunks if no degree divides the capacity evenly
    assert any(c % d for c in capacities for d in DEGREES)


def test_chunk_bounds():
    assert chunk_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert chunk_bounds(2, 8) == [(0, 1), (1, 2)]
    assert chunk_bounds(0, 4) == [(0, 0)]
    with pytest.raises(ConfigError):
        PipelineScheduler(0)


def traced_order(rank: int, world: int) -> list[tuple]:
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(M, E, H, scheduler=PipelineScheduler(4), capacity_factor=2.0,
                              trace=True)
    layer(torch.randn(40, M)).sum().backward()
    return [(e.task, e.chunk, e.stream, e.start, e.end) for e in layer.last_stats.events]


def test_pipeline_runs_in_schemoe_order():
    events = run_ranks(traced_order, 2)[0]
    forward = [e for e in events if ".bwd" not in e[0] and e[1] is not None]
    tasks = [(task, chunk) for task, chunk, *_ in forward]
    # C1 of every chunk first, then D1^i E^i C2^i per chunk, then every D2.
    compress1 = [tasks.index(("dispatch.compress", i)) for i in range(4)]
    experts = [tasks.index(("experts", i)) for i in range(4)]
    decompress2 = [tasks.index(("combine.decompress", i)) for i in range(4)]
    assert max(compress1) < min(experts) and max(experts) < min(decompress2)
    for i in range(4):
        assert tasks.index(("dispatch.decompress", i)) < experts[i] < \
            tasks.index(("combine.compress", i))
    comm = [e for e in forward if e[2] == "comm"]
    assert {(t, c) for t, c, *_ in comm} == {(n, i) for n in ("dispatch.a2a", "combine.a2a")
                                            for i in range(4)}
    backward = [(t, c) for t, c, *_ in events if t == "experts.bwd"]
    assert backward == [("experts.bwd", i) for i in range(4)]
