"""Codecs as the simulator sees them: bytes on the wire, throughput, per-call cost.

A codec is not simulated by what it computes but by what it costs: wire bytes per payload byte
(from bits per value plus per-row metadata, or a measured ratio for lossless codecs), the payload
bytes it encodes or decodes per second, and a fixed cost per call (launches, allocation, the
thread hand-off of CPU codecs). The built-ins below describe this project's codecs and a
ZFP-like fixed-rate codec (ScheMoE's: 8 bits per value whatever the input's dtype); a cluster
file overrides any field per codec, and calibration fits the throughputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import ConfigError
from ..control.validation import number


@dataclass(frozen=True)
class CodecModel:
    bits_per_value: float | None = None  # fixed-rate codecs; None: `ratio` decides
    per_row_bytes: float = 0.0  # metadata sent with each row (scales of int8/fp8)
    ratio: float = 1.0  # payload bytes / wire bytes, for codecs without a fixed rate (zstd)
    gbyte_s: float = 1000.0  # payload bytes encoded (or decoded) per second, in GB
    per_call_us: float = 0.0  # fixed cost of each encode or decode call

    def wire_fraction(self, dtype_bytes: int, model_dim: int) -> float:
        """Wire bytes per payload byte."""
        if self.bits_per_value is None:
            return 1.0 / self.ratio
        return self.bits_per_value / (8 * dtype_bytes) + self.per_row_bytes / (
            model_dim * dtype_bytes)

    def seconds(self, payload_bytes: float) -> float:
        """One encode (or decode) call of `payload_bytes`."""
        return self.per_call_us * 1e-6 + payload_bytes / (self.gbyte_s * 1e9)


# Defaults: GPU-class kernels for the casts and quantisers, one CPU thread for zstd (ratio and
# speed measured on this project's machine, REFERENCE.md section 5), cuZFP-class fixed rate.
BUILTIN = {
    "none": CodecModel(gbyte_s=float("inf")),  # nothing to encode
    "fp16": CodecModel(bits_per_value=16),
    "bf16": CodecModel(bits_per_value=16),
    "int8": CodecModel(bits_per_value=8, per_row_bytes=4),
    "fp8": CodecModel(bits_per_value=8, per_row_bytes=4),
    "zstd": CodecModel(ratio=1.15, gbyte_s=0.6, per_call_us=20),
    "zfp": CodecModel(bits_per_value=8, gbyte_s=60),
}
FIELDS = ("bits_per_value", "per_row_bytes", "ratio", "gbyte_s", "per_call_us")


def codec_model(name: str, overrides: dict[str, dict] | None = None) -> CodecModel:
    """The built-in model of codec `name` with a cluster's overrides applied."""
    own = (overrides or {}).get(name, {})
    if name not in BUILTIN and not own:
        raise ConfigError(f"no model of codec {name!r}: known {sorted(BUILTIN)}; describe "
                          f"others in the cluster file's \"codecs\" table with {FIELDS}")
    if not isinstance(own, dict):
        raise ConfigError(f"codec {name!r}: a codec is a JSON object of {FIELDS}, got {own!r}")
    unknown = set(own) - set(FIELDS)
    if unknown:
        raise ConfigError(f"codec {name!r}: unknown fields {sorted(unknown)}; known {FIELDS}")
    model = replace(BUILTIN.get(name, CodecModel()), **own)
    where = f"codec {name!r}"
    if model.bits_per_value is not None:
        number(where, "bits_per_value", model.bits_per_value, high=64, above=0)
    number(where, "per_row_bytes", model.per_row_bytes, high=1e9)
    number(where, "ratio", model.ratio, high=1e9, above=0)
    if model.gbyte_s != math.inf:  # inf: free (the `none` codec)
        number(where, "gbyte_s", model.gbyte_s, above=0)
    number(where, "per_call_us", model.per_call_us, high=1e12)
    return model
