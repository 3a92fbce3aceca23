"""Cast codecs: send fp32 payloads as fp16 or bf16 (2 bytes a value, no scales).

fp16 keeps 11 significant bits but overflows above 65504 (to inf); bf16 keeps fp32's range and
8 significant bits. Round to nearest even, as torch's casts do.
"""

from __future__ import annotations

import torch

from ...registry import register_compressor
from .compressor import SliceSpec, reinterpret
from .fixed import FixedSizeCodec


class CastCodec(FixedSizeCodec):
    wire_dtype: torch.dtype
    lossless = False

    def body_bytes(self, spec: SliceSpec) -> int:
        return spec.rows * spec.cols * 2

    def encode_body(self, x_PRC: torch.Tensor) -> torch.Tensor:
        P, R, C = x_PRC.shape
        return reinterpret(x_PRC.to(self.wire_dtype), torch.uint8, P, R * C * 2)

    def decode_body(self, body_PB: torch.Tensor, spec: SliceSpec) -> torch.Tensor:
        return reinterpret(body_PB[:, :self.body_bytes(spec)], self.wire_dtype,
                           body_PB.shape[0], spec.rows, spec.cols)

    def section_widths(self, cols: int) -> list[int]:
        return [cols * 2]

    def sections(self, x_RC: torch.Tensor) -> list[torch.Tensor]:
        return [reinterpret(x_RC.to(self.wire_dtype), torch.uint8, *x_RC.shape[:-1],
                            x_RC.shape[-1] * 2)]

    def from_sections(self, sections: list[torch.Tensor], cols: int) -> torch.Tensor:
        return reinterpret(sections[0], self.wire_dtype, sections[0].shape[0], cols)


@register_compressor("fp16")
class FP16Codec(CastCodec):
    codec_id = 2
    wire_dtype = torch.float16


@register_compressor("bf16")
class BF16Codec(CastCodec):
    codec_id = 3
    wire_dtype = torch.bfloat16
