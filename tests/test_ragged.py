"""Ragged rows against padded buffers: the same outputs and gradients on a skewed router (a few
hot experts), dropless and at a fixed capacity that drops pairs, for every scheduler, codec and
A2A algorithm, on 4 gloo ranks; and what the layout does with empty segments and ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import schedmoe
from schedmoe.plan.layout import RaggedLayout
from schedmoe.schedulers import AdaptiveScheduler, PipelineScheduler
from schedmoe.tools.testing import run_ranks

M, E, H = 8, 8, 16


def _skew(layer: schedmoe.MoELayer) -> None:
    """Make experts 0 and 5 hot: their gate rows line up with the inputs' common direction."""
    with torch.no_grad():
        layer.gate.wg_EM[0] += 2.0
        layer.gate.wg_EM[5] += 1.5


def _run(rank: int, ragged: bool, scheduler, options: dict, tokens: int):
    options = dict(options)
    capacity_factor = options.pop("capacity_factor", 0.0)
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(M, E, H, 2, capacity_factor, ragged=ragged, scheduler=scheduler(),
                              **options)
    _skew(layer)
    gen = torch.Generator().manual_seed(rank)
    x = (torch.randn(tokens, M, generator=gen) + 1.0).requires_grad_()
    outs = []
    for _ in range(2):  # twice: the adaptive scheduler profiles one candidate per call
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        (y.square().sum() + y.l_aux).backward()
        outs.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in layer.parameters()]))
    stats = layer.last_stats
    return outs, stats.wire_bytes, stats.capacity, stats.processed


SCHEDULERS = {
    "sequential": lambda: "sequential",
    "pipeline3": lambda: PipelineScheduler(3),
    "adaptive": lambda: AdaptiveScheduler(algorithms=("nccl", "pipe"), degrees=(1, 2, 4)),
}


def compare(rank: int, world: int, scheduler: str, options: dict) -> dict:
    tokens = 0 if rank == 3 else 10 + 4 * rank  # one rank without tokens
    padded = _run(rank, False, SCHEDULERS[scheduler], options, tokens)
    ragged = _run(rank, True, SCHEDULERS[scheduler], options, tokens)
    tol = dict(rtol=1e-5, atol=1e-5)  # lossy codecs too: they quantise row by row
    for (y_p, gx_p, gp_p), (y_r, gx_r, gp_r) in zip(padded[0], ragged[0]):
        torch.testing.assert_close(y_r, y_p, **tol)
        torch.testing.assert_close(gx_r, gx_p, **tol)
        for a, b in zip(gp_r, gp_p):
            torch.testing.assert_close(a, b, **tol)
    assert ragged[2] == padded[2]  # the same capacity (the largest segment)
    assert ragged[3] == padded[3]  # the same pairs reached an expert
    if options.get("capacity_factor", 0.0) <= 0:
        assert ragged[3] == 2 * tokens  # dropless: every pair did
    return {"padded": padded[1], "ragged": ragged[1], "processed": ragged[3], "tokens": tokens}


@pytest.mark.parametrize("scheduler,options", [
    ("sequential", {}),
    ("sequential", {"a2a": "2dh", "local_size": 2, "compressor": "zstd"}),
    ("pipeline3", {"a2a": "pipe", "local_size": 2, "compressor": "fp16"}),
    ("pipeline3", {"compressor": "bf16", "verify": True}),
    ("adaptive", {"compressor": "int8", "expert": "swiglu"}),
    ("sequential", {"expert": "clamped_glu", "shared_hidden_dim": 6, "shared_gate": True,
                    "compressor": "fp8"}),
    ("sequential", {"capacity_factor": 1.25}),
    ("pipeline3", {"capacity_factor": 1.0, "a2a": "2dh", "local_size": 2, "compressor": "int8"}),
    ("adaptive", {"capacity_factor": 2.0, "compressor": "zstd", "drop_policy": "probability"}),
])
def test_ragged_equals_padded_on_a_skewed_router(scheduler, options):
    wires = run_ranks(compare, 4, scheduler, options, timeout=300)
    if "capacity_factor" in options:  # the hot experts overflow: pairs were dropped
        assert sum(w["processed"] for w in wires) < 2 * sum(w["tokens"] for w in wires)
    dispatch_p = sum(w["padded"]["dispatch"][1] for w in wires)
    dispatch_r = sum(w["ragged"]["dispatch"][1] for w in wires)
    assert dispatch_r < dispatch_p  # padding is not sent


def test_layout_chunks_every_segment_alike():
    send_Wn = np.array([[3, 0], [1, 5]])
    layout = RaggedLayout(send_Wn, np.array([[2, 2], [0, 1]]), capacity=5)
    x_NM = torch.arange(9.0).unsqueeze(1)  # segment rows: [0 1 2] [] [3] [4 5 6 7 8]
    parts = [layout.slice(x_NM, lo, hi) for lo, hi in ((0, 2), (2, 4), (4, 5))]
    # chunk [lo, hi) of C = 5 takes rows [floor(lo n / 5), floor(hi n / 5)) of each segment
    assert [p.squeeze(1).tolist() for p in parts] == [[0, 4, 5], [1, 6, 7], [2, 3, 8]]
    assert layout.rows(0, 2, "send") == [1, 2] and layout.rows(2, 4, "recv") == [2, 0]
    assert torch.equal(layout.cat(parts, [(0, 2), (2, 4), (4, 5)]), x_NM)
    perm, counts = layout.expert_order(0, 5)  # received rows: (w0,e0) 2, (w0,e1) 2, (w1,e1) 1
    assert perm.tolist() == [0, 1, 2, 3, 4] and counts == [2, 3]


def test_custom_expert_without_per_expert_form_is_padded_per_group():
    """An expert plugin with only `forward` still runs ragged: its groups are padded to the
    largest local group, never to the group-wide capacity."""
    from schedmoe.ops.experts.forms import FFNExpert

    class Plain(FFNExpert):
        form_of = FFNExpert.form
        form = None

        def forward(self, x_ECM):
            return self.form_of(x_ECM, lambda x, w, b: torch.baddbmm(b.unsqueeze(1), x, w))

    expert = Plain(3, M, H)
    x = torch.randn(7, M)
    want = []
    for e, part in enumerate(torch.split(x, [2, 0, 5])):
        h = expert.activation(part @ expert.w1_EMH[e] + expert.b1_EH[e])
        want.append(h @ expert.w2_EHM[e] + expert.b2_EM[e])
    torch.testing.assert_close(expert.forward_ragged(x, [2, 0, 5]), torch.cat(want))


@pytest.mark.parametrize("grouped", [True, False])
def test_ragged_experts_grouped_and_per_expert_agree(grouped, monkeypatch):
    """torch._grouped_mm (aligned shapes) and per-expert GEMMs give the same rows and grads."""
    from schedmoe.ops.experts.forms import SwiGLUExpert

    torch.manual_seed(0)
    expert = SwiGLUExpert(4, 8, 12, bias=True, fused=True)
    if not grouped:
        monkeypatch.setattr(SwiGLUExpert, "_grouped_mm_fits", lambda self, x: False)
    assert expert._grouped_mm_fits(torch.zeros(1, 8)) == grouped
    x = torch.randn(10, 8, requires_grad=True)
    counts = [3, 0, 5, 2]
    y = expert.forward_ragged(x, counts)
    y.square().sum().backward()
    padded = torch.zeros(4, 5, 8)
    for e, part in enumerate(torch.split(x.detach(), counts)):
        padded[e, :part.shape[0]] = part
    want = torch.cat([expert(padded)[e, :n] for e, n in enumerate(counts)])
    torch.testing.assert_close(y, want)
    assert x.grad is not None and expert.w13_EM2H.grad is not None


def feedback(rank: int, world: int) -> list[float]:
    """int8+ef on ragged exchanges sends exactly what int8 sends (no residual crosses from
    one destination's rows to another's)."""
    outs = []
    for codec in ("int8+ef", "int8"):
        torch.manual_seed(0)
        layer = schedmoe.MoELayer(M, E, H, 2, 0.0, compressor=codec)
        x = torch.randn(12, M, generator=torch.Generator().manual_seed(rank))
        outs.append([layer(x).detach() for _ in range(3)])
    return [float((a - b).abs().max()) for a, b in zip(*outs)]


def test_error_feedback_stays_out_of_ragged_exchanges():
    for diffs in run_ranks(feedback, 2, timeout=60):
        assert diffs == [0.0, 0.0, 0.0]


def one_rank_groups_fixed_capacity(rank: int, world: int) -> list:
    """EP groups of one rank in a 2-rank world, fixed capacity with drops: ragged rows (no
    split sizes to swap), call after call (past the point where padded calls let the
    agreement ride on the dispatch), equal to the padded layer."""
    groups = [torch.distributed.new_group([r]) for r in range(world)]
    outs = {}
    for ragged in (True, False):
        torch.manual_seed(0)
        layer = schedmoe.MoELayer(M, E, H, 2, 0.5, ragged=ragged, group=groups[rank])
        _skew(layer)
        assert layer.ragged == ragged
        x = (torch.randn(32, M, generator=torch.Generator().manual_seed(rank)) + 1.0)
        outs[ragged] = [layer(x.clone().requires_grad_()) for _ in range(4)]
        assert layer.last_stats.dropped > 0
    for a, b in zip(outs[True], outs[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    return [layer.last_stats.dropped]


def test_one_rank_groups_run_fixed_capacity_ragged():
    dropped = run_ranks(one_rank_groups_fixed_capacity, 2, timeout=60)
    assert all(d[0] > 0 for d in dropped)


def test_ragged_chunks_are_equal_in_rows_under_skew():
    """One expert at 3x the mean (W = 4, 2 experts a rank, r = 4): cut by slot ranges the
    chunks are far apart in rows (max/mean > 2 here); cut by shares of every segment, each
    chunk carries a quarter of every rank's sends and receives (max/mean <= 1.1)."""
    from schedmoe.plan.layout import chunk_bounds

    W, n = 4, 2
    per_rank = np.array([384, 92, 92, 91, 91, 91, 91, 92])  # rows to experts 0..7
    counts_WE = np.stack([np.roll(per_rank, 0) + w for w in range(W)])  # every rank alike-ish
    layouts = [RaggedLayout(counts_WE[w].reshape(W, n), counts_WE[:, w * n:(w + 1) * n],
                            int(counts_WE.max())) for w in range(W)]
    bounds = chunk_bounds(layouts[0].capacity, 4)
    for side in ("send", "recv"):
        for layout in layouts:
            rows = [sum(layout.rows(lo, hi, side)) for lo, hi in bounds]
            assert sum(rows) == (layout.send_Wn if side == "send" else layout.recv_Wn).sum()
            assert max(rows) / np.mean(rows) <= 1.1, (side, rows)
    group = [sum(sum(layout.rows(lo, hi, "send")) for layout in layouts) for lo, hi in bounds]
    assert max(group) / np.mean(group) <= 1.1, group
    by_slots = [int(np.clip(np.minimum(counts_WE, hi) - lo, 0, None).sum()) for lo, hi in bounds]
    assert by_slots == [2990, 388, 388, 378] and sum(by_slots) == sum(group)  # the old cut
