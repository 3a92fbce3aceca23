"""The layer with every codec and every A2A algorithm against the uncompressed layer, 4 ranks."""

from __future__ import annotations

import torch

import schedmoe
from schedmoe.tools.testing import run_ranks

M, E, H = 64, 8, 32
# Largest relative error (max |a - b| / max |b|) allowed for output and gradients, per codec:
# a few times what one round trip of the codec costs through an expert.
TOLERANCE = {"none": 0.0, "zstd": 0.0, "fp16": 2e-3, "bf16": 1.5e-2, "int8": 3e-2, "fp8": 0.12}
ALGOS = ["nccl", "2dh", "pipe"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def run_layer(rank: int, compressor, a2a: str):
    torch.manual_seed(3)
    layer = schedmoe.MoELayer(M, E, H, top_k=2, capacity_factor=1.0, a2a=a2a, local_size=2,
                              compressor=compressor)
    x = torch.randn(24 + 5 * rank, M, generator=torch.Generator().manual_seed(rank))
    x = torch.relu(x).requires_grad_()  # sparse activations: zstd gets something to compress
    y = layer(x)
    (y * torch.linspace(-1, 1, M)).sum().backward()
    tensors = [y.detach(), x.grad] + [p.grad for p in layer.parameters()]
    return tensors, layer.last_stats.wire_bytes


def compare_codecs(rank: int, world: int) -> dict:
    reference, _ = run_layer(rank, "none", "nccl")
    worst, ratios = {}, {}
    for a2a in ALGOS:
        for codec, tol in TOLERANCE.items():
            tensors, wire = run_layer(rank, codec, a2a)
            errors = [rel(t, r) for t, r in zip(tensors, reference)]
            if tol == 0.0:
                assert all(torch.equal(t, r) for t, r in zip(tensors, reference)), (codec, a2a)
            assert max(errors) <= tol, (codec, a2a, errors)
            worst[f"{codec}/{a2a}"] = max(errors)
            ratios[codec] = {name: raw / sent for name, (raw, sent) in wire.items()}
    mixed, _ = run_layer(rank, {"dispatch": "fp8", "combine": "bf16", "combine_grad": "zstd"},
                         "pipe")
    assert max(rel(t, r) for t, r in zip(mixed, reference)) <= TOLERANCE["fp8"]
    return {"worst": worst, "ratios": ratios}


def test_every_codec_with_every_algorithm_matches_uncompressed():
    results = run_ranks(compare_codecs, 4, timeout=300)
    for r in results:
        for codec in ("int8", "fp8"):  # fp32 payload, 64 values a row + a 4-byte scale
            assert all(ratio >= 3.5 for ratio in r["ratios"][codec].values()), r["ratios"][codec]
        assert set(r["ratios"]["int8"]) == {"dispatch", "combine", "dispatch.bwd", "combine.bwd"}
        assert all(ratio == 1.0 for ratio in r["ratios"]["none"].values())
        assert r["ratios"]["zstd"]["dispatch"] > 1.0  # relu input: half the values are zero
    print({k: f"{v:.2e}" for k, v in results[0]["worst"].items()})
