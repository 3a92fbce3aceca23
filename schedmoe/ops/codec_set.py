"""Which codec each of a layer's four exchanges uses, and error feedback for lossy codecs.

The four exchanges: `dispatch` (tokens to experts), `combine` (expert outputs back), and the
gradients of each in backward (`dispatch_grad`, `combine_grad`). A lossy round trip has a
straight-through gradient: the incoming gradient is exchanged (and itself compressed with the
`*_grad` codec) as if the round trip were exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import torch

from ..errors import ConfigError
from ..registry import registry
from .compressor import Compressor, SliceSpec, Wire

EXCHANGES = ("dispatch", "combine", "dispatch_grad", "combine_grad")
CodecSpec = Union[str, type, Compressor]


class ErrorFeedback(Compressor):
    """Wraps a lossy codec: adds the previous call's compression error to the payload before
    compressing (EF-SGD). Meant for gradient exchanges, whose payloads line up step to step;
    the residual is dropped when the payload's shape changes. Name suffix: `"int8+ef"`."""

    lossless = False

    def __init__(self, inner: Compressor) -> None:
        if inner.lossless:
            raise ConfigError(f"error feedback needs a lossy codec, {inner.describe()} is lossless")
        self.inner = inner
        self.codec_id = inner.codec_id
        self.fixed_size = inner.fixed_size
        self.residual: torch.Tensor | None = None

    def describe(self) -> str:
        return self.inner.describe() + "+ef"

    def compress(self, x_P: torch.Tensor) -> Wire:
        x_P = x_P.float() if not x_P.is_floating_point() else x_P
        if self.residual is not None and self.residual.shape == x_P.shape:
            x_P = x_P + self.residual.to(x_P.dtype)
        wire = self.inner.compress(x_P)
        sent = self.inner.decompress(wire, SliceSpec(tuple(x_P.shape[1:]), x_P.dtype))
        self.residual = (x_P - sent).detach()
        return wire

    def decompress(self, wire: Wire, spec: SliceSpec) -> torch.Tensor:
        return self.inner.decompress(wire, spec)


def make_codec(spec: CodecSpec) -> Compressor:
    """A fresh codec from a registry name (`"int8"`, `"int8+ef"`), a class or an instance."""
    if isinstance(spec, Compressor):
        return spec
    if isinstance(spec, str) and spec.endswith("+ef"):
        return ErrorFeedback(make_codec(spec[:-3]))
    return registry("compressor").resolve(spec)()


@dataclass
class CodecSet:
    dispatch: Compressor
    combine: Compressor
    dispatch_grad: Compressor
    combine_grad: Compressor

    @classmethod
    def build(cls, spec: CodecSpec | Mapping[str, CodecSpec]) -> "CodecSet":
        """One codec for all four exchanges, or a mapping; missing `*_grad` entries default to
        the forward codec of the same exchange, and missing forward entries to `none`."""
        if not isinstance(spec, Mapping):
            return cls(*(make_codec(spec) for _ in EXCHANGES))
        unknown = set(spec) - set(EXCHANGES)
        if unknown:
            raise ConfigError(f"unknown compressor keys {sorted(unknown)}; use {EXCHANGES}")
        dispatch = spec.get("dispatch", "none")
        combine = spec.get("combine", "none")
        return cls(make_codec(dispatch), make_codec(combine),
                   make_codec(spec.get("dispatch_grad", dispatch)),
                   make_codec(spec.get("combine_grad", combine)))

    def describe(self) -> str:
        return ",".join(f"{name}={getattr(self, name).describe()}" for name in EXCHANGES)
