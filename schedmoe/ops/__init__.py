"""The math of an MoE step: experts and payload compressors, each registered by name."""

from .compressor import Compressor, NoCompression, SliceSpec
from .experts import Expert, FFNExpert, SwiGLUExpert, is_expert_parameter, mark_expert_parameters

__all__ = ["Compressor", "NoCompression", "SliceSpec", "Expert", "FFNExpert", "SwiGLUExpert",
           "is_expert_parameter", "mark_expert_parameters"]
