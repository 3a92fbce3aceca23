"""Codecs: exact round trips, error bounds, corrupt payloads, wire sizes, error feedback."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from schedmoe.errors import ConfigError
from schedmoe.ops import CorruptPayloadError, SliceSpec, Wire
from schedmoe.ops.codecs.codec_set import CodecSet, ErrorFeedback, make_codec
from schedmoe.ops.codecs.compressor import HEADER_BYTES

LOSSLESS = ["none", "zstd"]
LOSSY = ["fp16", "bf16", "int8", "fp8"]
DETERMINISTIC = settings(derandomize=True, max_examples=60, deadline=None)


def round_trip(codec, x):
    wire = codec.compress(x)
    assert wire.data.dtype == torch.uint8 and wire.data.dim() == 1
    assert sum(wire.sizes) == wire.data.numel() and len(wire.sizes) == x.shape[0]
    return codec.decompress(Wire(wire.data.clone(), list(wire.sizes)),
                            SliceSpec(tuple(x.shape[1:]), x.dtype))


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def special_values(dtype):
    info = torch.finfo(dtype)
    vals = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), info.max, -info.max,
            info.tiny, info.tiny / 4, -info.tiny / 2, info.eps, 1.0, -1.0]
    return torch.tensor(vals, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("name", LOSSLESS + ["zstd-noshuffle", "zstd-level19"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lossless_round_trip_is_bit_exact(name, dtype):
    from schedmoe.ops import ZstdCodec
    codec = {"zstd-noshuffle": ZstdCodec(shuffle=False),
             "zstd-level19": ZstdCodec(level=19)}.get(name) or make_codec(name)
    g = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(3, 5, 7, generator=g).to(dtype),
        torch.relu(torch.randn(4, 2, 3, 64, generator=g)).to(dtype),
        special_values(dtype).repeat(3, 2).view(3, 2, -1),
        torch.empty(3, 0, 8, dtype=dtype),  # no rows (capacity 0)
        torch.empty(0, 4, 8, dtype=dtype),  # no destinations
    ]
    nan_payload = torch.tensor([0x7FC00123], dtype=torch.int32).view(torch.float32)
    if dtype == torch.float32:
        cases.append(nan_payload.repeat(2, 1, 3))  # a NaN with payload bits
    for x in cases:
        y = round_trip(codec, x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.equal(bits(y), bits(x)), (name, dtype, x.shape)


finite32 = st.floats(-2.0 ** 100, 2.0 ** 100, allow_nan=False, allow_subnormal=True, width=32)


def payloads(elements=finite32):
    shape = st.tuples(st.integers(1, 3), st.integers(0, 4), st.integers(1, 9))
    return shape.flatmap(lambda s: arrays(np.float32, s, elements=elements))


@DETERMINISTIC
@given(payloads())
def test_int8_error_is_at_most_half_a_step(x_np):
    x = torch.from_numpy(x_np)
    y = round_trip(make_codec("int8"), x)
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert torch.all((y - x).abs() <= step / 2 * (1 + 1e-5))


@DETERMINISTIC
@given(payloads())
def test_fp8_error_bound(x_np):
    x = torch.from_numpy(x_np)
    y = round_trip(make_codec("fp8"), x)
    scale = x.abs().amax(dim=-1, keepdim=True) / 448
    bound = torch.maximum(x.abs() * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-5)
    assert torch.all((y - x).abs() <= bound)


@DETERMINISTIC
@given(payloads(st.floats(-60000.0, 60000.0, allow_nan=False, width=32)))
def test_fp16_error_bound(x_np):
    x = torch.from_numpy(x_np)
    y = round_trip(make_codec("fp16"), x)
    bound = torch.maximum(x.abs() * 2.0 ** -11, torch.full_like(x, 2.0 ** -25))
    assert torch.all((y - x).abs() <= bound)


@DETERMINISTIC
@given(payloads())
def test_bf16_error_bound(x_np):
    x = torch.from_numpy(x_np)
    y = round_trip(make_codec("bf16"), x)
    bound = torch.maximum(x.abs() * 2.0 ** -8, torch.full_like(x, 2.0 ** -134))
    assert torch.all((y - x).abs() <= bound)


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_quantisers_keep_nonfinite_rows_visible(name):
    x = torch.randn(2, 3, 8)
    x[0, 1, 4] = float("inf")
    x[1, 2, 0] = float("nan")
    y = round_trip(make_codec(name), x)
    assert torch.isnan(y[0, 1]).all() and torch.isnan(y[1, 2]).all()
    rest = torch.ones(2, 3, dtype=torch.bool)
    rest[0, 1] = rest[1, 2] = False
    assert torch.isfinite(y[rest]).all()


@pytest.mark.parametrize("name", LOSSY + LOSSLESS)
def test_corrupt_payloads_raise(name):
    codec = make_codec(name)
    x = torch.randn(3, 4, 16)
    spec = SliceSpec((4, 16), torch.float32)
    wire = codec.compress(x)

    def attempt(data, sizes, want_spec=spec):
        with pytest.raises(CorruptPayloadError):
            codec.decompress(Wire(data, sizes), want_spec)

    attempt(wire.data[:-1], wire.sizes)  # truncated
    attempt(wire.data[:-5], wire.sizes[:-1] + [wire.sizes[-1] - 5])  # truncated, sizes agree
    attempt(torch.cat([wire.data, torch.zeros(8, dtype=torch.uint8)]),
            wire.sizes[:-1] + [wire.sizes[-1] + 8])  # oversized
    attempt(wire.data, wire.sizes, SliceSpec((5, 16), torch.float32))  # shape mismatch
    if name != "none":  # `none` is headerless: its bytes are the payload itself
        bad = wire.data.clone()
        bad[wire.sizes[0] + 1] ^= 0xFF  # slice 1's magic
        attempt(bad, wire.sizes)
        attempt(wire.data, wire.sizes, SliceSpec((4, 16), torch.float16))  # dtype mismatch


def test_zstd_corrupt_frame_and_hostile_sizes():
    codec = make_codec("zstd")
    x = torch.relu(torch.randn(2, 64, 32))
    spec = SliceSpec((64, 32), torch.float32)
    wire = codec.compress(x)
    bad = wire.data.clone()
    bad[HEADER_BYTES + wire.sizes[0] // 2] ^= 0x5A  # inside slice 0's frame
    with pytest.raises(CorruptPayloadError, match="zstd"):
        codec.decompress(Wire(bad, wire.sizes), spec)
    # Frames that expand far beyond what the header allows: 256 MiB of zeros (a few KiB on the
    # wire), with and without a declared content size. Decoding stops at spec.nbytes.
    from schedmoe.ops.codecs.compressor import header_bytes
    for declare in (True, False):
        cctx = zstandard.ZstdCompressor(write_content_size=declare)
        bomb = cctx.compress(bytes(256 << 20)) if declare else \
            cctx.compressobj().compress(bytes(256 << 20)) + cctx.compressobj().flush()
        piece = header_bytes(codec.codec_id, spec, len(bomb)) + bomb
        data = torch.frombuffer(bytearray(piece), dtype=torch.uint8)
        with pytest.raises(CorruptPayloadError):
            codec.decompress(Wire(data, [len(piece)]), spec)


@pytest.mark.parametrize("name,payload_dtype,min_ratio", [
    ("int8", torch.float32, 3.5), ("fp8", torch.float32, 3.5),
    ("int8", torch.bfloat16, 1.8), ("fp8", torch.bfloat16, 1.8),
    ("bf16", torch.float32, 1.9), ("fp16", torch.float32, 1.9)])
def test_wire_size_reduction(name, payload_dtype, min_ratio):
    x = torch.randn(4, 2, 128, 256).to(payload_dtype)  # [P, experts, capacity, model_dim]
    wire = make_codec(name).compress(x)
    assert x.numel() * x.element_size() / wire.data.numel() >= min_ratio


def test_error_feedback_carries_the_residual():
    codec = ErrorFeedback(make_codec("int8"))
    x = torch.randn(2, 5, 16)
    spec = SliceSpec((5, 16), torch.float32)
    total = torch.zeros_like(x)
    for n in range(1, 9):
        total += codec.decompress(codec.compress(x), spec)
        # Everything sent so far equals n*x minus what is still owed (the residual).
        torch.testing.assert_close(total + codec.residual, n * x, rtol=0, atol=1e-5)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert torch.all((total / 8 - x).abs() <= step / 8)  # the mean converges as 1/n
    assert make_codec("fp8+ef").describe() == "FP8Codec+ef"


def test_codec_set_configuration():
    codecs = CodecSet.build({"dispatch": "int8", "combine": "bf16"})
    assert [type(c).__name__ for c in (codecs.dispatch, codecs.combine, codecs.dispatch_grad,
                                       codecs.combine_grad)] == \
        ["Int8Codec", "BF16Codec", "Int8Codec", "BF16Codec"]
    assert codecs.dispatch is not codecs.dispatch_grad  # separate state for error feedback
    with pytest.raises(ConfigError, match="unknown compressor keys"):
        CodecSet.build({"dispach": "int8"})
    with pytest.raises(ConfigError, match="lossless"):
        make_codec("zstd+ef")
    with pytest.raises(ConfigError, match="level"):
        from schedmoe.ops import ZstdCodec
        ZstdCodec(level=40)
    assert not math.isnan(CodecSet.build("none").dispatch.codec_id)
