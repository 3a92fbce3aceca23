"""Bad input and bad configs raise a clear error on every rank, within the timeout."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

import schedmoe
from schedmoe.errors import ConfigError, ConfigMismatchError, InputError, PeerError, RankError
from schedmoe.tools.testing import run_ranks

M, E, H = 8, 4, 16


def bad_input(rank: int, world: int, kind: str, bad_rank: int):
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(M, 6, H, check_finite=True, allow_empty=(kind != "empty"))
    x = torch.randn(6, M)
    if rank == bad_rank:
        x = {
            "last-dim": torch.randn(6, M + 1),
            "int-dtype": torch.ones(6, M, dtype=torch.int64),
            "nan": torch.where(torch.arange(M) == 3, float("nan"), x),
            "inf": torch.where(torch.arange(M) == 2, float("-inf"), x),
            "empty": torch.randn(0, M),
        }[kind]
    layer(x)


EXPECTED = {
    "last-dim": ("last dimension 9 instead of model_dim (8)", "rank 1's input has last dimension"),
    "int-dtype": ("non-floating dtype", "rank 1's input has a non-floating dtype"),
    "nan": ("NaN or Inf", "rank 1's input has NaN or Inf"),
    "inf": ("NaN or Inf", "rank 1's input has NaN or Inf"),
    "empty": ("no tokens", "rank 1's input has no tokens"),
}


def check_every_rank_raises(results, exc_type, *fragments_by_rank):
    assert len(results) == len(fragments_by_rank)
    for rank, (res, fragment) in enumerate(zip(results, fragments_by_rank)):
        assert isinstance(res, exc_type), f"rank {rank}: expected {exc_type.__name__}, got {res!r}"
        assert fragment in str(res), f"rank {rank}: {fragment!r} not in {str(res)!r}"


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_bad_input_fails_on_every_rank(kind):
    start = time.monotonic()
    results = run_ranks(bad_input, 3, kind, 1, return_exceptions=True, timeout=60)
    own, others = EXPECTED[kind]
    check_every_rank_raises(results, InputError, others, own, others)
    assert time.monotonic() - start < 30


def test_bad_input_single_process():
    layer = schedmoe.MoELayer(M, E, H, check_finite=True)
    with pytest.raises(InputError, match=r"last dimension 3 instead of model_dim \(8\)"):
        layer(torch.randn(4, 3))
    with pytest.raises(InputError, match="non-floating dtype"):
        layer(torch.ones(4, M, dtype=torch.int32))
    with pytest.raises(InputError, match="NaN or Inf"):
        layer(torch.full((4, M), float("inf")))
    with pytest.raises(InputError, match="non-tensor instead of a torch.Tensor"):
        layer([[0.0] * M])
    assert layer(torch.randn(0, M)).shape == (0, M)  # an empty batch is a no-op by default


def experts_not_divisible(rank: int, world: int):
    schedmoe.MoELayer(M, 6, H)


def test_experts_not_divisible_by_world():
    results = run_ranks(experts_not_divisible, 4, return_exceptions=True, timeout=60)
    check_every_rank_raises(results, ConfigError, *["must be divisible by the EP group size (4)"] * 4)


def mismatched(rank: int, world: int, field: str):
    options = {"num_experts": E, "top_k": 2}
    if rank == 1:
        options[field] = {"num_experts": 2 * E, "top_k": 1}[field]
    layer = schedmoe.MoELayer(M, hidden_dim=H, **options)
    layer(torch.randn(5, M))


@pytest.mark.parametrize("field", ["num_experts", "top_k"])
def test_config_mismatch_across_ranks(field):
    results = run_ranks(mismatched, 2, field, return_exceptions=True, timeout=60)
    check_every_rank_raises(results, ConfigMismatchError, *[f"{field} differs across"] * 2)


def layers_in_another_order(rank: int, world: int, options: dict):
    """Two layers with the same options, called A then B on rank 0 and B then A elsewhere;
    three rounds, so that fixed capacity has its record riding on the dispatch by then."""
    torch.manual_seed(0)
    a, b = (schedmoe.MoELayer(M, E, H, **options) for _ in range(2))
    x = torch.randn(6, M)
    for _ in range(2):
        a(x), b(x)
    for layer in (a, b) if rank == 0 else (b, a):
        layer(x)


@pytest.mark.parametrize("options", [{"capacity_factor": 0.0},  # dropless: an all-gather
                                     {"capacity_factor": 1.25, "ragged": False}])  # rider
def test_layers_called_in_another_order_on_one_rank(options):
    results = run_ranks(layers_in_another_order, 2, options, return_exceptions=True, timeout=60)
    check_every_rank_raises(results, ConfigMismatchError,
                            *["called different MoE layers in one call (rank 0: MoE layer #0"] * 2)


def rank_dies(rank: int, world: int):
    dist.barrier()  # every rank past init: a death during another's init is not the case here
    layer = schedmoe.MoELayer(M, E, H)
    if rank == 1:
        os._exit(3)
    layer(torch.randn(5, M))


def rank_never_calls(rank: int, world: int):
    layer = schedmoe.MoELayer(M, E, H)
    if rank == 1:
        time.sleep(60)
    layer(torch.randn(5, M))


def test_dead_peer_gives_peer_error():
    results = run_ranks(rank_dies, 2, return_exceptions=True, collective_timeout=5, timeout=60)
    assert isinstance(results[0], PeerError), results[0]
    assert "peer rank died" in str(results[0])
    assert isinstance(results[1], RankError) and "exit code 3" in str(results[1])


def test_peer_that_never_calls_in_times_out():
    start = time.monotonic()
    results = run_ranks(rank_never_calls, 2, return_exceptions=True, collective_timeout=3,
                        timeout=15)
    assert isinstance(results[0], PeerError), results[0]
    assert isinstance(results[1], RankError) and "did not finish within 15 s" in str(results[1])
    assert "time.sleep" in results[1].remote_traceback or "rank_never_calls" in \
        results[1].remote_traceback
    assert time.monotonic() - start < 40


def test_bad_constructor_arguments():
    with pytest.raises(ConfigError, match="top_k"):
        schedmoe.MoELayer(M, E, H, top_k=E + 1)
    with pytest.raises(ConfigError, match="drop_policy"):
        schedmoe.MoELayer(M, E, H, drop_policy="random")
    with pytest.raises(ConfigError, match="hidden_dim"):
        schedmoe.MoELayer(M, E, 0)
    with pytest.raises(ConfigError, match="activation"):
        schedmoe.MoELayer(M, E, H, activation="tanhh")
