"""Which codec each of a layer's four exchanges uses, and error feedback for lossy codecs.

The four exchanges: `dispatch` (tokens to experts), `combine` (expert outputs back), and the
gradients of each in backward (`dispatch_grad`, `combine_grad`). A lossy round trip has a
straight-through gradient: the incoming gradient is exchanged (and itself compressed with the
`*_grad` codec) as if the round trip were exact.

Error feedback (`"int8+ef"`) keeps one residual per payload stream, that is per exchange and per
chunk (`CodecSet.stream`), and adds it only to the next payload of the same stream with the same
shape. Token payloads are laid out by the routing, so a residual means something only if the
next call puts the same tokens in the same slots: the layer hashes every rank's layout into its
per-call agreement and `observe_layout` drops every residual when any rank's layout changed.
Where it cannot help: in training the routing (and so the layout) changes every step, so the
residuals are dropped every step and error feedback sends exactly what the codec alone would.
It pays off only when layouts repeat (fixed routing, the same batch again). Ragged (unpadded
rows) exchanges send without it: each destination's rows are their own payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import torch

from ...errors import ConfigError
from ...registry import registry
from ...streams.lanes import lanes_for
from .checksum import Checksummed
from .compressor import Compressor, SliceSpec, Wire

EXCHANGES = ("dispatch", "combine", "dispatch_grad", "combine_grad")
CodecSpec = Union[str, type, Compressor]


class ErrorFeedback(Compressor):
    """Wraps a lossy codec: adds the previous payload's compression error to this one before
    compressing (EF-SGD). One instance per payload stream (see the module docstring); the
    residual is dropped when the payload's shape changes or by `reset`. Suffix `"int8+ef"`."""

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
        # The residual is state every call shares: on the `stats` lane, so that micro-batches
        # on streams of their own read and replace it in turn (streams/lanes.py).
        lanes = lanes_for(x_P.device)
        with lanes.on("stats", x_P, self.residual):
            x_P = x_P.float() if not x_P.is_floating_point() else x_P
            if self.residual is not None and self.residual.shape == x_P.shape:
                x_P = x_P + self.residual.to(x_P.dtype)
            wire = self.inner.compress(x_P)
            sent = self.inner.decompress(wire, SliceSpec(tuple(x_P.shape[1:]), x_P.dtype))
            self.residual = (x_P - sent).detach()
        lanes.join("stats", wire.data)
        return wire

    def decompress(self, wire: Wire, spec: SliceSpec) -> torch.Tensor:
        return self.inner.decompress(wire, spec)

    def wire_bytes(self, spec: SliceSpec) -> int | None:
        return self.inner.wire_bytes(spec)

    def without_feedback(self) -> Compressor:
        return self.inner

    def reset(self) -> None:
        self.residual = None


def make_codec(spec: CodecSpec) -> Compressor:
    """A fresh codec from a registry name (`"int8"`, `"int8+ef"`), a class or an instance."""
    if isinstance(spec, Compressor):
        return spec
    if isinstance(spec, str) and spec.endswith("+ef"):
        return ErrorFeedback(make_codec(spec[:-3]))
    return registry("compressor").resolve(spec)()


@dataclass
class CodecSet:
    """The codec of each exchange; `stream(exchange, chunk)` is what a scheduler uses."""

    dispatch: Compressor
    combine: Compressor
    dispatch_grad: Compressor
    combine_grad: Compressor
    verify: bool = False  # wrap every codec in a per-slice checksum

    def __post_init__(self) -> None:
        self._streams: dict[tuple[str, int | None], Compressor] = {}
        self._layout: object = None

    @classmethod
    def build(cls, spec: CodecSpec | Mapping[str, CodecSpec], verify: bool = False) -> "CodecSet":
        """One codec for all four exchanges, or a mapping; missing `*_grad` entries default to
        the forward codec of the same exchange, and missing forward entries to `none`."""
        if not isinstance(spec, Mapping):
            return cls(*(make_codec(spec) for _ in EXCHANGES), verify=verify)
        unknown = set(spec) - set(EXCHANGES)
        if unknown:
            raise ConfigError(f"unknown compressor keys {sorted(unknown)}; use {EXCHANGES}")
        dispatch = spec.get("dispatch", "none")
        combine = spec.get("combine", "none")
        return cls(make_codec(dispatch), make_codec(combine),
                   make_codec(spec.get("dispatch_grad", dispatch)),
                   make_codec(spec.get("combine_grad", combine)), verify=verify)

    def stream(self, exchange: str, chunk: int | None = None) -> Compressor:
        """The codec for chunk `chunk` of `exchange`: error feedback gets its own residual per
        (exchange, chunk); with `verify`, a checksum wraps it."""
        key = (exchange, chunk)
        if key not in self._streams:
            codec = getattr(self, exchange)
            if isinstance(codec, ErrorFeedback):
                codec = ErrorFeedback(codec.inner)
            self._streams[key] = Checksummed(codec) if self.verify else codec
        return self._streams[key]

    @property
    def traceable(self) -> bool:
        """Whether torch.compile can trace every exchange's codec: fixed-size and stateless
        (no error feedback, no checksum)."""
        return not self.verify and all(
            getattr(self, name).fixed_size and not isinstance(getattr(self, name), ErrorFeedback)
            for name in EXCHANGES)

    @property
    def uses_feedback(self) -> bool:
        return any(isinstance(getattr(self, name), ErrorFeedback) for name in EXCHANGES)

    def observe_layout(self, layout: object) -> None:
        """Drop every error-feedback residual when the token layout differs from the last."""
        if layout != self._layout:
            for codec in self._streams.values():
                if isinstance(_unwrapped(codec), ErrorFeedback):
                    _unwrapped(codec).reset()
        self._layout = layout

    def runtime_state(self) -> dict:
        """The error-feedback residuals by stream, and the layout they belong to."""
        residuals = {key: _unwrapped(c).residual.clone() for key, c in self._streams.items()
                     if isinstance(_unwrapped(c), ErrorFeedback)
                     and _unwrapped(c).residual is not None}
        return {"layout": self._layout, "residuals": residuals} if residuals else {}

    def load_runtime_state(self, state: dict) -> None:
        self._layout = state.get("layout")
        for (exchange, chunk), residual in state.get("residuals", {}).items():
            _unwrapped(self.stream(exchange, chunk)).residual = residual

    def describe(self) -> str:
        names = ",".join(f"{name}={getattr(self, name).describe()}" for name in EXCHANGES)
        return names + (",verify" if self.verify else "")


def _unwrapped(codec: Compressor) -> Compressor:
    """The codec inside a checksum wrapper."""
    return codec.inner if isinstance(codec, Checksummed) else codec
