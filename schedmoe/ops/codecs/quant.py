"""Quantising codecs with one fp32 scale per row, carried in the same buffer as the values.

Legend: P slices, R rows (tokens), C values per row.

int8: scale = max|row| / 127, q = round(x / scale) (to nearest; error <= scale / 2).
fp8 (e4m3): scale = max|row| / 448, q = fp8(x / scale) (3 mantissa bits: relative error
<= 2^-4, absolute <= scale * 2^-10 near zero).
Rows holding NaN or Inf decode as all-NaN, so a bad value is never silently turned finite.
On CUDA tensors the fused kernels of `schedmoe.ops.codecs.cuda_kernels` are used when available.
"""

from __future__ import annotations

import torch

from ...registry import register_compressor
from . import cuda_kernels
from .compressor import HEADER_BYTES, SliceSpec, Wire, pad_to_align, reinterpret
from .fixed import FixedSizeCodec


class RowScaledCodec(FixedSizeCodec):
    """Body: scales fp32 [R], then the quantised values [R, C] (1 byte each)."""

    lossless = False
    qmax: float
    wire_dtype: torch.dtype

    def body_bytes(self, spec: SliceSpec) -> int:
        return spec.rows * 4 + spec.rows * spec.cols

    @property
    def fp8(self) -> bool:
        return self.wire_dtype == torch.float8_e4m3fn

    def compress(self, x_P: torch.Tensor) -> Wire:
        """On CUDA with cupy: one fused kernel writes scales and values into the wire."""
        if not (x_P.is_cuda and cuda_kernels.available()):
            return super().compress(x_P)
        P = x_P.shape[0]
        spec = SliceSpec(tuple(x_P.shape[1:]), x_P.dtype)
        body = pad_to_align(self.body_bytes(spec))
        wire_PB = torch.zeros(P, HEADER_BYTES + body, dtype=torch.uint8, device=x_P.device)
        wire_PB[:, :HEADER_BYTES] = self.header(spec, body, x_P.device)
        cuda_kernels.pack_rows(x_P.reshape(P, spec.rows, spec.cols), wire_PB, HEADER_BYTES,
                               self.fp8)
        return Wire(wire_PB.view(-1), [HEADER_BYTES + body] * P)

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

    def section_widths(self, cols: int) -> list[int]:
        return [4, cols]  # each row's scale, then its values

    def sections(self, x_RC: torch.Tensor) -> list[torch.Tensor]:
        R, C = x_RC.shape
        scale_1R, q_1RC = self.quantise(x_RC.unsqueeze(0))
        return [reinterpret(scale_1R, torch.uint8, R, 4), reinterpret(q_1RC, torch.uint8, R, C)]

    def from_sections(self, sections: list[torch.Tensor], cols: int) -> torch.Tensor:
        scale_R = reinterpret(sections[0], torch.float32, sections[0].shape[0])
        q_RC = reinterpret(sections[1], self.wire_dtype, sections[1].shape[0], cols)
        return q_RC.float() * scale_R.unsqueeze(-1)

    def decode_body(self, body_PB: torch.Tensor, spec: SliceSpec) -> torch.Tensor:
        if body_PB.is_cuda and cuda_kernels.available():
            return cuda_kernels.unpack_rows(body_PB, spec.rows, spec.cols, self.fp8)
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
