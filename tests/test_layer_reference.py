"""MoELayer against an independent dense reference: outputs, drops and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import schedmoe
from reference import dense_moe
from schedmoe.tools.testing import run_ranks

M, H, E = 8, 12, 8
LOSS_AUX = 0.3

# (name, layer options, tokens per rank as a function of rank)
CASES = [
    ("top1-fixed", dict(top_k=1, capacity_factor=1.0), lambda r: 12 + 5 * r),
    ("top2-fixed", dict(top_k=2, capacity_factor=1.0), lambda r: 12 + 5 * r),
    ("top2-prob", dict(top_k=2, capacity_factor=0.5, drop_policy="probability"),
     lambda r: 20 - 3 * r),
    ("top2-dropless", dict(top_k=2, capacity_factor=0.0), lambda r: 12 + 5 * r),
    ("top1-dropless", dict(top_k=1, capacity_factor=0.0), lambda r: 9 + 2 * r),
    ("top1-capped", dict(top_k=1, capacity_factor=-1.0), lambda r: 16),
    ("top2-relu", dict(top_k=2, capacity_factor=1.5, activation="relu"), lambda r: 10 + r),
    ("top2-swiglu", dict(top_k=2, capacity_factor=1.25, expert="swiglu"), lambda r: 14),
    ("top2-empty-rank", dict(top_k=2, capacity_factor=1.0), lambda r: 0 if r == 1 else 11),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(b.abs().max().item(), 1e-6) if b.numel() else 1.0
    return (a - b).abs().max().item() / scale if a.numel() else 0.0


def global_weights(seed: int, expert: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {"wg": torch.randn(E, M, generator=g)}
    w["w1"] = torch.randn(E, M, H, generator=g) / M ** 0.5
    w["w2"] = torch.randn(E, H, M, generator=g) / H ** 0.5
    if expert == "swiglu":
        w["w3"] = torch.randn(E, M, H, generator=g) / M ** 0.5
    else:
        w["b1"] = torch.randn(E, H, generator=g) * 0.1
        w["b2"] = torch.randn(E, M, generator=g) * 0.1
    return w


LAYER_PARAM = {"w1": "w1_EMH", "w2": "w2_EHM", "w3": "w3_EMH", "b1": "b1_EH", "b2": "b2_EM"}


def check_case(rank: int, world: int, seed: int, options: dict, tokens) -> dict:
    expert = options.get("expert", "ffn")
    activation = options.get("activation", "silu" if expert == "swiglu" else "gelu")
    w = global_weights(seed, expert)
    layer = schedmoe.MoELayer(M, E, H, **options)
    lo, hi = rank * (E // world), (rank + 1) * (E // world)
    with torch.no_grad():
        layer.gate.wg_EM.copy_(w["wg"])
        for key, name in LAYER_PARAM.items():
            if key in w:
                getattr(layer.experts, name).copy_(w[key][lo:hi])

    xs = [torch.randn(tokens(r), M, generator=torch.Generator().manual_seed(seed * 100 + r))
          for r in range(world)]
    gs = [torch.randn(tokens(r), M, generator=torch.Generator().manual_seed(seed * 100 + 50 + r))
          for r in range(world)]

    x = xs[rank].clone().requires_grad_()
    y = layer(x)
    ((y * gs[rank]).sum() + LOSS_AUX * y.l_aux).backward()
    gate_grad = layer.gate.wg_EM.grad.clone()
    if dist.is_initialized():
        dist.all_reduce(gate_grad)

    ref_w = {k: v.clone().requires_grad_() for k, v in w.items()}
    ref_x = [xr.clone().requires_grad_() for xr in xs]
    loss, outs = 0.0, []
    for r in range(world):
        y_r, aux_r, keep_r = dense_moe(
            ref_x[r], ref_w["wg"], ref_w, top_k=options["top_k"],
            cf=options["capacity_factor"], num_experts=E, activation=activation,
            policy=options.get("drop_policy", "position"))
        loss = loss + (y_r * gs[r]).sum() + LOSS_AUX * aux_r
        outs.append((y_r, aux_r, keep_r))
    loss.backward()
    y_ref, aux_ref, keep_ref = outs[rank]

    stats = layer.last_stats
    assert stats.kept_TK.tolist() == keep_ref, "dropped pairs differ from the reference"
    assert stats.processed + stats.dropped == tokens(rank) * options["top_k"]
    assert sum(stats.dropped_per_expert) == stats.dropped
    errors = {
        "y": rel_err(y.detach(), y_ref.detach()),
        "aux": rel_err(y.l_aux.detach(), aux_ref.detach()),
        "x.grad": rel_err(x.grad, ref_x[rank].grad),
        "gate.grad": rel_err(gate_grad, ref_w["wg"].grad),
    }
    for key, name in LAYER_PARAM.items():
        if key in w:
            errors[name + ".grad"] = rel_err(getattr(layer.experts, name).grad,
                                             ref_w[key].grad[lo:hi])
    bad = {k: v for k, v in errors.items() if not v <= 1e-5}
    assert not bad, f"relative errors above 1e-5: {bad}"
    return {"dropped": stats.dropped, "tokens": tokens(rank)}


def check_all_cases(rank: int, world: int) -> dict[str, dict]:
    torch.manual_seed(0)
    return {name: check_case(rank, world, seed, options, tokens)
            for seed, (name, options, tokens) in enumerate(CASES, start=1)}


def assert_drops_as_designed(per_rank: list[dict[str, dict]]) -> None:
    for name, options, _ in CASES:
        dropped = sum(r[name]["dropped"] for r in per_rank)
        if options["capacity_factor"] == 0:
            assert dropped == 0, f"{name}: dropless dropped {dropped}"
        elif name in ("top1-fixed", "top2-fixed", "top2-prob"):
            assert dropped > 0, f"{name}: the case is meant to drop tokens but dropped none"


def test_single_process_matches_reference():
    assert not dist.is_initialized()
    assert_drops_as_designed([check_all_cases(0, 1)])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_expert_parallel_matches_reference(world):
    assert_drops_as_designed(run_ranks(check_all_cases, world, timeout=240))


def layer_outputs_per_algorithm(rank: int, world: int) -> dict[str, list[torch.Tensor]]:
    out = {}
    for name in ("nccl", "2dh", "pipe"):
        torch.manual_seed(7)  # identical weights for every algorithm
        layer = schedmoe.MoELayer(M, E, H, top_k=2, capacity_factor=1.0, a2a=name, local_size=2)
        x = torch.randn(10 + 3 * rank, M, generator=torch.Generator().manual_seed(rank))
        x.requires_grad_()
        y = layer(x)
        (y.square().sum() + y.l_aux).backward()
        out[name] = [y.detach(), x.grad] + [p.grad for p in layer.parameters()]
    return out


def test_layer_identical_across_a2a_algorithms():
    for rank_out in run_ranks(layer_outputs_per_algorithm, 4, timeout=120):
        for name, tensors in rank_out.items():
            for got, want in zip(tensors, rank_out["nccl"]):
                assert torch.equal(got, want), name
