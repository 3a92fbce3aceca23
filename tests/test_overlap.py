"""Micro-batches interleaved (overlap/microbatches.py) against running them one after the other,
bit for bit, on 2 or 4 gloo ranks; the order they run in; errors; and the gradient chunks of
GradSync waiting for the link (overlap/grad_sync.py). GradSync's training result against
single-process training is in test_parallel.py."""

from __future__ import annotations

import pytest
import torch

import schedmoe.parallel as par
from schedmoe.errors import ConfigError
from schedmoe.overlap import GradSync, interleaved_step, link, turns
from schedmoe.schedulers import AdaptiveScheduler, PipelineScheduler
from schedmoe.tools.testing import run_ranks
from schedmoe.tools.train.model import MoELM

VOCAB, DIM, SEQ = 50, 16, 8


def _model(group=None, **moe) -> MoELM:
    torch.manual_seed(0)
    options = dict(dim=DIM, layers=2, heads=2, seq=SEQ, hidden_dim=32, num_experts=4, top_k=2)
    options.update(moe)
    return MoELM(VOCAB, group=group, **options)


def _batches(rank: int, count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    return [torch.randint(VOCAB, (2, SEQ), generator=gen) for _ in range(count)]


def _loss(model: MoELM, tokens: torch.Tensor) -> torch.Tensor:
    logits, aux = model(tokens)  # aux from the layers' aux_loss: the micro-batch's own
    return logits.square().mean() + 0.1 * aux


def _pipeline() -> PipelineScheduler:
    return PipelineScheduler(2)


def _adaptive() -> AdaptiveScheduler:
    return AdaptiveScheduler(degrees=(1, 2), trial_steps=1)


def _interleaved_vs_one_by_one(rank: int, world: int, options: dict, count: int):
    options = dict(options)
    scheduler = options.pop("scheduler", None)
    if scheduler is not None:
        options["scheduler"] = scheduler()
    model = _model(**options)
    batches = _batches(rank, count)
    for _ in range(2):  # twice: the adaptive scheduler profiles one candidate per call
        model.zero_grad()
        want = [float(_loss(model, b).detach()) for b in batches]
        model.zero_grad()
        for b in batches:
            _loss(model, b).backward()
        reference = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        order = []
        hooks = [block.register_forward_pre_hook(
            lambda _m, _a, i=i: order.append((turns.index(), i)))
            for i, block in enumerate(model.blocks)]
        got = [float(loss) for loss in interleaved_step(lambda b: _loss(model, b), batches)]
        for hook in hooks:
            hook.remove()
        # The adaptive scheduler may chunk a call differently in the two runs, and a GEMM over
        # fewer rows may round differently: close there, bit for bit otherwise.
        exact = scheduler is not _adaptive
        assert got == want if exact else got == pytest.approx(want, rel=1e-6)
        for name, p in model.named_parameters():
            if exact:
                assert torch.equal(p.grad, reference[name]), name
            else:
                torch.testing.assert_close(p.grad, reference[name], rtol=1e-5, atol=1e-7)
    return order


@pytest.mark.parametrize("world,count,options", [
    (2, 2, {"capacity_factor": 1.25}),
    (2, 2, {"capacity_factor": 0, "scheduler": _pipeline, "a2a": "pipe",
            "compressor": "int8"}),
    (2, 3, {"capacity_factor": 1.0, "ragged": False, "compressor": "zstd"}),  # agreement rides
    (4, 2, {"capacity_factor": 2.0, "a2a": "2dh", "local_size": 2, "num_experts": 8,
            "scheduler": _adaptive}),
])
def test_interleaved_micro_batches_equal_one_after_the_other(world, count, options):
    orders = run_ranks(_interleaved_vs_one_by_one, world, options, count, timeout=180)
    # Each block starts for every micro-batch, in turn, before the next block starts for any:
    # a micro-batch hands over the turn at its first dispatch.
    assert orders[0] == [(m, block) for block in range(2) for m in range(count)]


def test_interleaved_step_single_process():
    orders = _interleaved_vs_one_by_one(0, 1, {"capacity_factor": 1.0}, 2)
    # One rank still exchanges (with itself) and hands over at each wait.
    assert orders == [(0, 0), (1, 0), (0, 1), (1, 1)]


def _failing_micro_batch(rank: int, world: int) -> str:
    model = _model()
    batches = _batches(rank, 2)

    def step(tokens):
        if tokens is batches[1]:
            raise ValueError("micro-batch 1 failed")
        return _loss(model, tokens)

    with pytest.raises(ValueError, match="micro-batch 1 failed"):
        interleaved_step(step, batches)
    with pytest.raises(ConfigError, match="scalar loss"):
        interleaved_step(lambda b: model(b)[0], batches)
    # The layers are still usable and in step on every rank.
    interleaved_step(lambda b: _loss(model, b), batches)
    return "ok"


def test_interleaved_step_raises_a_micro_batch_error_after_all_ended():
    assert run_ranks(_failing_micro_batch, 2, timeout=120) == ["ok"] * 2
    with pytest.raises(ConfigError, match="at least one"):
        interleaved_step(lambda b: b, [])


def _chunks_wait_for_the_link(rank: int, world: int) -> tuple[int, int, int]:
    layout = par.init_parallel(world)
    model = _model(group=layout.ep_group)
    sync = GradSync(model, layout, chunk_bytes=256, window=2)
    class Blocker:  # an exchange that never ends: the link stays busy
        pass

    blocker = Blocker()
    link.exchange_started(blocker)
    _loss(model, _batches(rank, 1)[0]).backward()
    ready = sum(chunk.flat is not None for chunk in sync.chunks)
    held = sync._next  # sent while the link was busy: none
    link.exchange_arrived(blocker)  # idle: the next ones go out, no more than the window
    sent = sync._next
    sync.finish()
    with pytest.raises(ConfigError, match="micro_batches"):  # two backward passes, one expected
        for b in _batches(rank, 2):
            _loss(model, b).backward()
    sync.close()
    return ready, held, sent


def test_grad_chunks_go_out_only_while_no_exchange_is_in_flight():
    for ready, held, sent in run_ranks(_chunks_wait_for_the_link, 2, timeout=120):
        assert ready > 2 and held == 0 and sent == 2


def test_micro_batch_threads_inherit_grad_mode_and_autocast():
    seen = []

    def step(x):
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"),
                     torch.get_autocast_dtype("cpu")))
        return (x * x).sum()

    x = torch.ones(3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        interleaved_step(step, [x, x])
    assert seen == [(True, True, torch.bfloat16)] * 2
    assert torch.equal(x.grad, torch.full((3,), 4.0))  # 2x from each of the two micro-batches
