"""Quantising codecs with one fp32 scale per row, carried in the same buffer as the values.

Legend: P slices, R rows (tokens), C values per row.

int8: scale = max|row| / 127, q = round(x / scale) (to nearest; error <= scale / 2).
fp8 (e4m3): scale = max|row| / 448, q = fp8(x / scale) (3 mantissa bits: relative error
<= 2^-4, absolute <= scale * 2^-10 near zero).
Rows holding NaN or Inf decode as all-NaN, so a bad value is never silently turned finite.
On CUDA tensors the fused kernels of `schedmoe.ops.codecs.cuda_kernels` are used when available
(one launch for all destinations, padded or ragged).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from ...comm.host import to_device
from ...registry import register_compressor
from ...streams.lanes import lane_key
from . import cuda_kernels
from .compressor import HEADER_BYTES, SliceSpec, Wire, reinterpret
from .fixed import FixedSizeCodec, _row_geometry


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
        """On CUDA with cupy: one fused kernel writes every slice's scales and values."""
        if not _kernel_takes(x_P):
            return super().compress(x_P)
        P = x_P.shape[0]
        spec = SliceSpec(tuple(x_P.shape[1:]), x_P.dtype)
        size = self.wire_bytes(spec)
        wire_PB = torch.zeros(P, size, dtype=torch.uint8, device=x_P.device)
        wire_PB[:, :HEADER_BYTES] = self.header(spec, size - HEADER_BYTES, x_P.device)
        starts, offsets = _even_geometry(P, spec.rows, size, x_P.device)
        cuda_kernels.pack_rows(x_P.reshape(P * spec.rows, spec.cols).contiguous(), wire_PB,
                               starts, offsets, HEADER_BYTES, self.fp8)
        return Wire(wire_PB.view(-1), [size] * P)

    def compress_rows(self, x_NM: torch.Tensor, rows: list[int]) -> Wire:
        """On CUDA with cupy: every destination's rows in one launch (headers placed by one
        indexed copy)."""
        if not _kernel_takes(x_NM):
            return super().compress_rows(x_NM, rows)
        row_shape, per = _row_geometry(x_NM)
        specs = [SliceSpec((n, *row_shape), x_NM.dtype) for n in rows]
        sizes = [self.wire_bytes(spec) for spec in specs]
        offsets = [0, *itertools.accumulate(sizes)]
        wire = torch.zeros(offsets[-1], dtype=torch.uint8, device=x_NM.device)
        heads = torch.cat([self.header(spec, size - HEADER_BYTES, x_NM.device)
                           for spec, size in zip(specs, sizes)])
        at = np.add.outer(np.asarray(offsets[:-1]), np.arange(HEADER_BYTES)).reshape(-1)
        wire[to_device(torch.from_numpy(at), x_NM.device)] = heads
        starts = to_device([0, *itertools.accumulate(n * per for n in rows)], x_NM.device)
        cuda_kernels.pack_rows(x_NM.reshape(-1, row_shape[-1]).contiguous(), wire, starts,
                               to_device(offsets[:-1], x_NM.device), HEADER_BYTES, self.fp8)
        return Wire(wire, sizes)

    def decode_rows(self, data: torch.Tensor, specs: list[SliceSpec],
                    starts: list[int]) -> torch.Tensor | None:
        """On CUDA with cupy: every destination's rows in one launch, in the specs' dtype."""
        if not (specs and _kernel_takes(data, specs[0].dtype)):
            return None
        rows = to_device([0, *itertools.accumulate(spec.rows for spec in specs)], data.device)
        return cuda_kernels.unpack_rows(data, rows, to_device(starts, data.device),
                                        HEADER_BYTES, sum(spec.rows for spec in specs),
                                        specs[0].cols, self.fp8, specs[0].dtype)

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
        if _kernel_takes(body_PB, spec.dtype):  # rows of body p start p * stride(0) bytes in
            P = body_PB.shape[0]
            starts, offsets = _even_geometry(P, spec.rows, body_PB.stride(0), body_PB.device)
            return cuda_kernels.unpack_rows(body_PB, starts, offsets, 0, P * spec.rows,
                                            spec.cols, self.fp8, spec.dtype
                                            ).view(P, spec.rows, spec.cols)
        P, R, C = body_PB.shape[0], spec.rows, spec.cols
        scale_PR = reinterpret(body_PB[:, :4 * R], torch.float32, P, R)
        q_PRC = reinterpret(body_PB[:, 4 * R:4 * R + R * C], self.wire_dtype, P, R, C)
        return q_PRC.float() * scale_PR.unsqueeze(-1)


def _kernel_takes(t: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether the fused kernels serve `t` (to or from `dtype`): CUDA, cupy, a dtype they
    read, and an address their vector loads may use."""
    return (t.is_cuda and (dtype or t.dtype) in cuda_kernels.DTYPES
            and cuda_kernels.available() and t.data_ptr() % 16 == 0)


_GEOMETRY: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _even_geometry(P: int, rows: int, size: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row starts and byte offsets of P equal slices, on the device (made once per shape)."""
    key = (P, rows, size, device, lane_key(device))  # copied in on the current lane
    if key not in _GEOMETRY:
        if len(_GEOMETRY) >= 256:
            _GEOMETRY.clear()
        _GEOMETRY[key] = (to_device([p * rows for p in range(P + 1)], device),
                          to_device([p * size for p in range(P)], device))
    return _GEOMETRY[key]


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
