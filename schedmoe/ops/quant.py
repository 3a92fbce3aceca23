"""Quantising codecs with one fp32 scale per row, carried in the same buffer as the values.

Legend: P slices, R rows (tokens), C values per row.

int8: scale = max|row| / 127, q = round(x / scale) (to nearest; error <= scale / 2).
fp8 (e4m3): scale = max|row| / 448, q = fp8(x / scale) (3 mantissa bits: relative error
<= 2^-4, absolute <= scale * 2^-10 near zero).
Rows holding NaN or Inf decode as all-NaN, so a bad value is never silently turned finite.
On CUDA tensors the fused kernels of `schedmoe.ops.cuda_kernels` are used when available.
"""

from __future__ import annotations

import torch

from ..registry import register_compressor
from .compressor import FixedSizeCodec, SliceSpec, reinterpret


class RowScaledCodec(FixedSizeCodec):
    """Body: scales fp32 [R], then the quantised values [R, C] (1 byte each)."""

    lossless = False
    qmax: float
    wire_dtype: torch.dtype

    def body_bytes(self, spec: SliceSpec) -> int:
        return spec.rows * 4 + spec.rows * spec.cols

    def quantise(self, x_PRC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale_PR fp32, q_PRC of wire_dtype)."""
        x = x_PRC.float()
        if x.shape[-1] == 0:
            return x.new_ones(x.shape[:-1]), x.to(self.wire_dtype)
        amax_PR = x.abs().amax(dim=-1)
        finite_PR = torch.isfinite(amax_PR)
        scale_PR = torch.where(amax_PR > 0, amax_PR / self.qmax, torch.ones_like(amax_PR))
        scale_PR = torch.where(finite_PR, scale_PR, torch.ones_like(scale_PR))
        q = self.to_wire((x / scale_PR.unsqueeze(-1)).clamp(-self.qmax, self.qmax))
        q = torch.where(finite_PR.unsqueeze(-1), q, torch.zeros_like(q))
        scale_PR = torch.where(finite_PR, scale_PR, torch.full_like(scale_PR, float("nan")))
        return scale_PR, q

    def to_wire(self, y: torch.Tensor) -> torch.Tensor:
        return y.to(self.wire_dtype)

    def encode_body(self, x_PRC: torch.Tensor) -> torch.Tensor:
        P, R, C = x_PRC.shape
        scale_PR, q_PRC = self.quantise(x_PRC)
        return torch.cat([reinterpret(scale_PR, torch.uint8, P, R * 4),
                          reinterpret(q_PRC, torch.uint8, P, R * C)], dim=1)

    def decode_body(self, body_PB: torch.Tensor, spec: SliceSpec) -> torch.Tensor:
        P, R, C = body_PB.shape[0], spec.rows, spec.cols
        scale_PR = reinterpret(body_PB[:, :4 * R], torch.float32, P, R)
        q_PRC = reinterpret(body_PB[:, 4 * R:4 * R + R * C], self.wire_dtype, P, R, C)
        return q_PRC.float() * scale_PR.unsqueeze(-1)


@register_compressor("int8")
class Int8Codec(RowScaledCodec):
    codec_id = 4
    qmax = 127.0
    wire_dtype = torch.int8

    def to_wire(self, y: torch.Tensor) -> torch.Tensor:
        return torch.round(y).to(torch.int8)


@register_compressor("fp8")
class FP8Codec(RowScaledCodec):
    codec_id = 5
    qmax = 448.0
    wire_dtype = torch.float8_e4m3fn
