"""After a typed error raised on every rank, the next step equals a clean run's.

A training step whose second micro-batch meets a bad input on one rank (InputError on every
rank, inside `interleaved_step`, with `GradSync` chunks already out on some ranks) is dropped
with `sync.discard()`; the run then equals one that never took that step. A layer whose call
raised (dropless, riding, pipelined or adaptive) gives a clean layer's results at the next call.
A rank's own exception is reported even if its cleanup would abort the process.
"""

from __future__ import annotations

import os

import pytest
import torch

import schedmoe
import schedmoe.parallel as par
from schedmoe.errors import InputError
from schedmoe.overlap import GradSync, interleaved_step, turns
from schedmoe.schedulers import AdaptiveScheduler, PipelineScheduler
from schedmoe.tools.testing import run_ranks
from schedmoe.tools.train.model import MoELM

VOCAB, DIM, SEQ = 50, 16, 8


def _batches(rank: int, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randint(VOCAB, (2, SEQ), generator=gen) for _ in range(2)]


def _train(rank: int, world: int, failing_step: int | None, how: str = "nan") -> dict:
    """Steps 0-2 on EP 2 x DP 2 with GradSync and two interleaved micro-batches. With
    `failing_step`, rank 1's second micro-batch holds NaN at the second block's MoE layer in
    that step: InputError on every rank of its EP group, which discard the step, and the other
    EP group's finish() drops it too. `how="after backward"`: rank 1 alone raises after the
    step's backward, when its chunks are out. Without `failing_step`, step 1 is never taken."""
    layout = par.init_parallel(2)
    torch.manual_seed(0)
    model = MoELM(VOCAB, dim=DIM, layers=2, heads=2, seq=SEQ, hidden_dim=32, num_experts=4,
                  top_k=2, capacity_factor=0, check_finite=True, group=layout.ep_group)
    sync = GradSync(model, layout, micro_batches=2, chunk_bytes=256, window=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    poisoned = {"step": None}
    model.blocks[1].moe.register_forward_pre_hook(
        lambda _m, args: (torch.full_like(args[0], float("nan")),)
        if poisoned["step"] is not None and how == "nan" and rank == 1 and turns.index() == 1
        else None)

    def loss_of(tokens):
        logits, aux = model(tokens)
        return logits.square().mean() + 0.1 * aux

    outcomes = []
    for step in range(3):
        if failing_step is None and step == 1:
            continue
        poisoned["step"] = step if step == failing_step else None
        try:
            interleaved_step(loss_of, _batches(rank, step))
            if step == failing_step and how == "after backward" and rank == 1:
                raise InputError("rank 1 found its loss wanting")
            if sync.finish():
                opt.step()
                outcomes.append("stepped")
            else:  # another EP group raised and dropped the step
                outcomes.append("dropped")
        except InputError as exc:
            outcomes.append(str(exc))
            sync.discard()
        opt.zero_grad()
    sync.close()
    return {"outcomes": outcomes, "params": {n: p.detach().clone()
                                             for n, p in model.named_parameters()}}


@pytest.mark.parametrize("how", ["nan", "after backward"])
def test_a_discarded_grad_sync_step_leaves_the_run_as_if_never_taken(how):
    failed = run_ranks(_train, 4, 1, how, timeout=180)
    clean = run_ranks(_train, 4, None, timeout=180)
    raised_on = (0, 1) if how == "nan" else (1,)  # rank 1's EP group; rank 1 alone
    for rank, (got, want) in enumerate(zip(failed, clean)):
        first, middle, last = got["outcomes"]
        assert (first, last) == ("stepped", "stepped"), got["outcomes"]
        if rank in raised_on:
            assert "input has NaN or Inf" in middle or "wanting" in middle, (rank, middle)
        else:
            assert middle == "dropped", (rank, middle)
        assert want["outcomes"] == ["stepped"] * 2
        for name, value in want["params"].items():
            torch.testing.assert_close(got["params"][name], value, rtol=1e-6, atol=1e-7,
                                       msg=f"rank {rank}: {name}")


M, E, H, T = 8, 4, 16, 12
PATHS = {"dropless": {"capacity_factor": 0.0}, "riding": {"capacity_factor": 1.25,
                                                           "ragged": False}}
SCHEDULERS = {"pipeline": lambda: PipelineScheduler(2),
              "adaptive": lambda: AdaptiveScheduler(degrees=(1, 2), algorithms=("nccl",),
                                                    trial_steps=1, shortlist=2, drift=1e9)}


def _layer_after_errors(rank: int, world: int, path: str, scheduler: str) -> list[str]:
    def build():
        torch.manual_seed(0)
        return schedmoe.MoELayer(M, E, H, 2, scheduler=SCHEDULERS[scheduler](),
                                 check_finite=True, **PATHS[path])

    layer, clean = build(), build()
    x = torch.randn(T, M, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    bad = torch.full_like(x, float("nan")) if rank == 1 else x
    raised = []
    for call in range(8):
        if call in (3, 5):  # mid-tuning for the adaptive one, riding for the padded one
            try:
                layer(bad)
            except InputError as exc:
                raised.append(type(exc).__name__)
            continue
        y, y_clean = layer(x), clean(x)
        torch.testing.assert_close(y, y_clean, rtol=1e-5, atol=1e-6, msg=f"call {call}")
        g, = torch.autograd.grad(y.square().sum(), x)
        g_clean, = torch.autograd.grad(y_clean.square().sum(), x)
        torch.testing.assert_close(g, g_clean, rtol=1e-5, atol=1e-6, msg=f"call {call}")
    return raised


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_a_layer_after_a_typed_error_equals_a_clean_one(path, scheduler):
    assert run_ranks(_layer_after_errors, 2, path, scheduler,
                     timeout=120) == [["InputError"] * 2] * 2


def _fails_then_cleanup_aborts(rank: int, world: int) -> None:
    import schedmoe.tools.launch

    if rank == 1:  # as when gloo aborts the process on exchanges still arriving
        schedmoe.tools.launch.release_groups = lambda: os.abort()
        raise ValueError("rank 1's own error")
    torch.distributed.barrier()


def test_a_ranks_own_error_is_reported_before_its_cleanup():
    results = run_ranks(_fails_then_cleanup_aborts, 2, return_exceptions=True, timeout=60,
                        collective_timeout=5)
    assert isinstance(results[1], ValueError) and "rank 1's own error" in str(results[1])
