"""The math of an MoE step: experts and payload codecs, each registered by name."""

from .cast import BF16Codec, FP16Codec
from .compressor import Compressor, CorruptPayloadError, NoCompression, SliceSpec, Wire
from .experts import Expert, FFNExpert, SwiGLUExpert, is_expert_parameter, mark_expert_parameters
from .quant import FP8Codec, Int8Codec
from .zstd import ZstdCodec

__all__ = ["Compressor", "CorruptPayloadError", "NoCompression", "SliceSpec", "Wire",
           "BF16Codec", "FP16Codec", "FP8Codec", "Int8Codec", "ZstdCodec",
           "Expert", "FFNExpert", "SwiGLUExpert", "is_expert_parameter", "mark_expert_parameters"]
