"""The compressor interface for A2A payloads, and the `none` codec.

A compressor turns the `[P, ...]` tensor about to be exchanged (slice p goes to rank p) into a
wire tensor whose dim 0 is also P, and turns what arrives back into a tensor of the original
slice shape and dtype. Codecs declare whether they are lossless and whether the wire size
depends on the data (then the exchange sends sizes first and uses uneven splits).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..registry import register_compressor


@dataclass(frozen=True)
class SliceSpec:
    """Shape (without the leading P) and dtype of one uncompressed slice."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class Compressor(ABC):
    """Encodes a payload for the wire and decodes what arrives."""

    lossless: ClassVar[bool]
    fixed_size: ClassVar[bool]

    @abstractmethod
    def compress(self, x_P: torch.Tensor) -> torch.Tensor:
        """Wire tensor for `x_P` ([P, ...]); dim 0 stays P."""

    @abstractmethod
    def decompress(self, wire_P: torch.Tensor, spec: SliceSpec) -> torch.Tensor:
        """The [P, *spec.shape] tensor of dtype spec.dtype encoded in `wire_P`."""


@register_compressor("none")
class NoCompression(Compressor):
    """Sends the payload as it is."""

    lossless = True
    fixed_size = True

    def compress(self, x_P: torch.Tensor) -> torch.Tensor:
        return x_P

    def decompress(self, wire_P: torch.Tensor, spec: SliceSpec) -> torch.Tensor:
        return wire_P
