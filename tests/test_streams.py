"""The CUDA executor's ordering (streams/lanes.py), checked on the CPU: every layer call runs on
a checking lane backend (streams/checking.py) that files each op under its lane and fails on
any read or write another lane's access is not ordered with, and on any tensor used on a lane
it was not handed to: the rules the CUDA stream sanitizer and the caching allocator hold a
GPU run to. Every scheduler x codec x layout, forward and backward, on 1 and 2 ranks, shared
experts on their lane, 2dh/pipe/staged exchanges, and interleaved micro-batches. The checker
itself is checked: it catches a dropped wait, a dropped hand-over and a dropped arrival.
"""

from __future__ import annotations

import pytest
import torch

import schedmoe
from schedmoe.overlap import interleaved_step
from schedmoe.streams import lanes
from schedmoe.streams.checking import CheckingLanes, LaneRaceError
from schedmoe.tools.testing import run_ranks

M, E, H, T = 16, 4, 32, 32
LAYOUTS = {"padded": {"capacity_factor": 1.25, "ragged": False},
           "ragged": {"capacity_factor": 1.25},
           "dropless": {"capacity_factor": 0.0}}
SCHEDULERS = ("sequential", "pipeline", "adaptive")
CODECS = ("none", "fp16", "bf16", "int8", "fp8", "zstd")


def _layer(layout: str, scheduler: str, codec: str, **extra) -> schedmoe.MoELayer:
    torch.manual_seed(0)
    return schedmoe.MoELayer(M, E, H, scheduler=scheduler, compressor=codec,
                             shared_hidden_dim=8, **LAYOUTS[layout], **extra)


def _checked_steps(layer: schedmoe.MoELayer, x: torch.Tensor, steps: int = 2) -> CheckingLanes:
    """`steps` forward + backward calls on checking lanes; the checker after them."""
    checker = CheckingLanes()
    with lanes.checking(checker), checker:
        for _ in range(steps):
            layer(x).square().sum().backward()
    return checker


def _grid(rank: int, world: int, cases: list[tuple[str, str, str]], a2a: str = "nccl"
          ) -> list[tuple]:
    """Each case: two unchecked calls (an adaptive layer profiles), two checked ones, and the
    checked result against an unchecked twin's. Returns (case, errors, lanes used, equal)."""
    found = []
    for layout, scheduler, codec in cases:
        layer = _layer(layout, scheduler, codec, a2a=a2a, local_size=1)
        twin = _layer(layout, scheduler, codec, a2a=a2a, local_size=1)
        twin.load_state_dict(layer.state_dict())
        x = torch.randn(T, M, generator=torch.Generator().manual_seed(rank), requires_grad=True)
        for model in (layer, twin):
            for _ in range(2):
                model(x).square().sum().backward()
        checker = _checked_steps(layer, x)
        for _ in range(2):
            twin(x).square().sum().backward()
        equal = all(torch.equal(a.grad, b.grad) for a, b in
                    zip(layer.parameters(), twin.parameters()) if a.grad is not None)
        found.append(((layout, scheduler, codec), checker.errors[:3], sorted(checker.ops),
                      equal))
    return found


CASES = [(layout, scheduler, codec) for layout in LAYOUTS for scheduler in SCHEDULERS
         for codec in CODECS]


def _assert_clean(results: list[tuple]) -> None:
    for case, errors, used, equal in results:
        assert errors == [], (case, errors)
        # the work really was spread over the lanes the executor names (the `none` codec's
        # compression does no work on one rank)
        want = {"compute", "compute/decode", "compute/shared"} | (
            {"compute/codec"} if case[2] != "none" else set())
        assert want <= set(used), (case, used)
        assert equal, case


def test_every_schedule_is_ordered_on_one_rank():
    _assert_clean(_grid(0, 1, CASES))


def _two_ranks(rank: int, world: int, a2a: str) -> list[tuple]:
    cases = CASES if a2a == "nccl" else [("ragged", "pipeline", "int8"),
                                         ("padded", "sequential", "none")]
    return _grid(rank, world, cases, a2a)


@pytest.mark.parametrize("a2a", ["nccl", "2dh", "pipe", "staged"])
def test_every_schedule_is_ordered_on_two_ranks(a2a):
    for results in run_ranks(_two_ranks, 2, a2a, timeout=600):
        _assert_clean(results)
        for _, _, used, _ in results:
            # collectives were seen: on lanes of their own, or in an algorithm's wait
            assert any(lane.startswith("exchange") or lane.endswith("/comm") for lane in used)


def _interleaved(rank: int, world: int) -> tuple[list, list[str], list[float], list[float]]:
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(M, E, H, scheduler="pipeline", compressor="int8",
                              shared_hidden_dim=8)
    batches = [torch.randn(T, M, generator=torch.Generator().manual_seed(10 * rank + i))
               for i in range(2)]
    checker = CheckingLanes()
    with lanes.checking(checker), checker:
        losses = interleaved_step(lambda b: layer(b).square().sum(), batches)
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    for b in batches:  # one after the other, inline
        layer(b).square().sum().backward()
    same = [float((a - p.grad).abs().max()) for a, p in zip(grads, layer.parameters())]
    return checker.errors[:3], sorted(checker.ops), [float(v) for v in losses], same


def test_interleaved_micro_batches_each_run_on_their_own_lane():
    for errors, used, losses, diffs in run_ranks(_interleaved, 2, timeout=300):
        assert errors == []
        assert {"compute/micro-batch 0", "compute/micro-batch 1",
                "compute/micro-batch 0/codec", "compute/micro-batch 1/codec",
                "compute/micro-batch 0/decode", "compute/micro-batch 1/decode"} <= set(used)
        assert max(diffs) == 0.0


def test_cpu_calls_run_inline():
    assert not lanes.lanes_for(torch.device("cpu")).overlaps
    assert not lanes.MicroBatchLanes(2).overlaps


# -- the checker catches what it is for --------------------------------------------------------

def test_checker_flags_an_unordered_read_and_an_unkept_tensor():
    checker = CheckingLanes()
    lanes_ = lanes.Lanes(checker)
    with checker:
        x = torch.ones(4) * 2  # made on compute
        with checker.use("compute/codec"):  # no wait, no hand-over
            y = x + 1
        assert len(checker.errors) == 2  # unordered read, and not handed over
        checker.errors.clear()
        with lanes_.on("codec", x):  # ordered and handed over
            y = x + 1
        lanes_.join("codec", y)
        z = y * 3
        assert checker.errors == [] and torch.equal(z, torch.full((4,), 9.0))
        with lanes_.on("codec", y):
            y.add_(1)  # a write after compute's read of y: ordered by `on`
        y.mul_(2)  # compute writes what codec wrote, without a join
        assert any("overwrites" in e for e in checker.errors)
    with pytest.raises(LaneRaceError):
        checker.raise_errors()


def _dropped(what: str) -> list[str]:
    """A layer call on checking lanes with one ordering call of the executor disabled."""
    layer = _layer("ragged", "pipeline", "int8")
    x = torch.randn(T, M, requires_grad=True)
    original = {"join": lanes.Lanes.join, "keep": CheckingLanes.keep,
                "arrive": lanes.Lanes.arrive}[what]
    target = CheckingLanes if what == "keep" else lanes.Lanes
    setattr(target, what, lambda *a, **k: None)
    try:
        return _checked_steps(layer, x, 1).errors
    finally:
        setattr(target, what, original)


@pytest.mark.parametrize("what", ["join", "keep"])
def test_checker_catches_a_dropped_ordering_call(what):
    assert _dropped(what)


def _dropped_arrival(rank: int, world: int) -> int:
    return len(_dropped("arrive"))


def test_checker_catches_a_dropped_arrival():
    assert all(n > 0 for n in run_ranks(_dropped_arrival, 2))


def _interleaved_with_shared_state(rank: int, world: int, options: dict) -> tuple[list, list]:
    """State every call updates (error-feedback residuals, aux-free balancing counts) under
    two micro-batches on lanes of their own."""
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(M, E, H, scheduler="pipeline", **options)
    batches = [torch.randn(T, M, generator=torch.Generator().manual_seed(10 * rank + i))
               for i in range(2)]
    checker = CheckingLanes()
    with lanes.checking(checker), checker:
        interleaved_step(lambda b: layer(b).square().sum(), batches)
    return checker.errors[:3], sorted(checker.ops)


@pytest.mark.parametrize("options", [
    {"compressor": "int8+ef", "capacity_factor": 1.25, "ragged": False},
    {"gate": "sigmoid_grouped", "gate_options": {"bias_update_rate": 0.01}},
], ids=["error-feedback", "aux-free-balancing"])
def test_state_every_call_shares_is_updated_on_one_lane(options):
    for errors, used in run_ranks(_interleaved_with_shared_state, 2, options, timeout=300):
        assert errors == []
        assert "stats" in used  # the shared state's lane
