"""The modular ops of an MoE step, each registered by name: payload codecs (`codecs/`) and
expert forms (`experts/`).

Data plane. May import: `errors`, `registry`, `comm`, `streams` (the lane of shared state).
"""

from .codecs.cast import BF16Codec, FP16Codec
from .codecs.compressor import Compressor, CorruptPayloadError, NoCompression, SliceSpec, Wire
from .codecs.quant import FP8Codec, Int8Codec
from .codecs.zstd import ZstdCodec
from .experts import Expert, FFNExpert, SwiGLUExpert, is_expert_parameter, mark_expert_parameters

__all__ = ["Compressor", "CorruptPayloadError", "NoCompression", "SliceSpec", "Wire",
           "BF16Codec", "FP16Codec", "FP8Codec", "Int8Codec", "ZstdCodec",
           "Expert", "FFNExpert", "SwiGLUExpert", "is_expert_parameter", "mark_expert_parameters"]
