"""The compressor interface for A2A payloads, the wire header, and the `none` codec.

Legend: P destination ranks (slices), R rows per slice, C values per row (the last dim).

A compressor turns the `[P, ...]` tensor about to be exchanged (slice p goes to rank p) into a
`Wire`: one flat uint8 buffer holding the P encoded slices back to back, and each slice's byte
count (the A2A's split sizes). Every slice starts with a 32-byte header (magic, codec, dtype,
rows, columns, body length) and carries its own scales, so one exchange moves everything and
the receiver can check what arrives before decoding it. Codecs declare whether they are
lossless and whether their wire size is fixed (then every slice has the same size and no size
exchange is needed) or data-dependent.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ...errors import SchedMoEError
from ...registry import register_compressor

MAGIC = b"SMW1"
HEADER = struct.Struct("<4sBBBBQQQ")  # magic, version, codec, dtype, reserved, rows, cols, body
HEADER_BYTES = HEADER.size  # 32
ALIGN = 8

DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4,
               torch.uint8: 5, torch.int8: 6, torch.int32: 7, torch.int64: 8}


class CorruptPayloadError(SchedMoEError, ValueError):
    """A received payload is truncated, corrupted, oversized or not what was expected."""


@dataclass(frozen=True)
class SliceSpec:
    """Shape (without the leading P) and dtype of one uncompressed slice."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def cols(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def rows(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel // self.cols if self.cols else 0

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Wire:
    """Encoded slices back to back (`data`, uint8, 1-D) and each slice's size in bytes."""

    data: torch.Tensor
    sizes: list[int]


def as_uint8(raw: bytes, device: torch.device | str = "cpu") -> torch.Tensor:
    """A uint8 tensor holding a copy of `raw` (empty allowed)."""
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).to(device)


def reinterpret(t: torch.Tensor, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    """The bytes of `t` read as `dtype` in `shape` (copies only if `t` is not contiguous)."""
    return t.contiguous().reshape(-1).view(dtype).view(*shape)


def pad_to_align(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def header_bytes(codec_id: int, spec: SliceSpec, body: int) -> bytes:
    return bytes(header_ints(codec_id, spec, body))


def header_ints(codec_id: int, spec: SliceSpec, body: int) -> list[int]:
    """The `HEADER` of a slice as byte values, in plain arithmetic (torch.compile traces it
    into constants, where `struct` would break the graph)."""
    if spec.dtype not in DTYPE_CODES:
        raise TypeError(f"cannot put {spec.dtype} on the wire; supported: {list(DTYPE_CODES)}")
    fields = (spec.rows, spec.cols, body)  # little-endian u64 each
    return [*MAGIC, 1, codec_id, DTYPE_CODES[spec.dtype], 0,
            *[(value >> (8 * i)) & 0xFF for value in fields for i in range(8)]]


def check_header(raw: bytes, codec_id: int, spec: SliceSpec, available: int, where: str) -> int:
    """Validate one slice's header against what the receiver expects; returns the body length."""
    if len(raw) < HEADER_BYTES:
        raise CorruptPayloadError(f"{where}: {len(raw)} bytes, shorter than the "
                                  f"{HEADER_BYTES}-byte header (truncated payload)")
    magic, version, codec, dtype, _, rows, cols, body = HEADER.unpack(raw[:HEADER_BYTES])
    expected = {"magic": MAGIC, "version": 1, "codec": codec_id, "dtype": DTYPE_CODES[spec.dtype],
                "rows": spec.rows, "cols": spec.cols}
    found = {"magic": magic, "version": version, "codec": codec, "dtype": dtype, "rows": rows,
             "cols": cols}
    for key, want in expected.items():
        if found[key] != want:
            raise CorruptPayloadError(
                f"{where}: header {key} is {found[key]!r}, expected {want!r} (corrupt payload, "
                "or ranks using different codecs or shapes)")
    if body != available - HEADER_BYTES:
        raise CorruptPayloadError(
            f"{where}: header declares a {body}-byte body but {available - HEADER_BYTES} bytes "
            "arrived (truncated or oversized payload)")
    return body


def check_sizes(wire: Wire, name: str, size: int | None = None) -> None:
    """Raise CorruptPayloadError unless the slice sizes are non-negative ints that add up to the
    buffer (and all equal `size`, for codecs whose slices have one known size)."""
    sizes = wire.sizes
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sizes) or \
            sum(sizes) != wire.data.numel() or (size is not None and any(s != size for s in sizes)):
        want = f"{len(sizes)} slices of {size} bytes" if size is not None else \
            "non-negative slice sizes adding up to the buffer"
        raise CorruptPayloadError(
            f"{name}: expected {want}, got sizes {list(sizes)[:8]} over {wire.data.numel()} "
            "bytes (truncated, oversized or corrupt payload)")


class Compressor(ABC):
    """Encodes a `[P, ...]` payload for the wire and decodes what arrives."""

    codec_id: ClassVar[int]  # in every header; built-ins use 0-31, plugins pick 128-255
    lossless: ClassVar[bool]
    fixed_size: ClassVar[bool]

    @abstractmethod
    def compress(self, x_P: torch.Tensor) -> Wire:
        """Encode slice p of `x_P` for rank p."""

    def describe(self) -> str:
        """Name and settings; must be equal on every rank that exchanges with this codec."""
        return type(self).__name__

    def wire_bytes(self, spec: SliceSpec) -> int | None:
        """Bytes of one slice of `spec` on the wire, or None if they depend on the data (then
        ragged exchanges swap the sizes first)."""
        return None

    def without_feedback(self) -> "Compressor":
        """This codec without error feedback (a ragged exchange compresses each destination's
        rows on their own, and a residual must never move to another destination's rows)."""
        return self

    @abstractmethod
    def decompress(self, wire: Wire, spec: SliceSpec) -> torch.Tensor:
        """The `[len(wire.sizes), *spec.shape]` tensor of dtype `spec.dtype` in `wire`.
        Raises CorruptPayloadError if a slice is not a valid encoding of `spec`."""

    def compress_rows(self, x_NM: torch.Tensor, rows: list[int]) -> Wire:
        """Ragged rows: slice p is the next `rows[p]` rows of `x_NM`, each encoded on its own."""
        wires = [self.compress(piece.unsqueeze(0)) for piece in torch.split(x_NM, rows)]
        return Wire(torch.cat([wire.data for wire in wires]), [wire.sizes[0] for wire in wires])

    def decompress_rows(self, wire: Wire, specs: list[SliceSpec]) -> torch.Tensor:
        """The rows of every slice (slice p holds `specs[p]`), back to back."""
        pieces = [self.decompress(Wire(piece, [size]), spec)[0] for piece, size, spec
                  in zip(torch.split(wire.data, wire.sizes), wire.sizes, specs)]
        return torch.cat(pieces)


@register_compressor("none")
class NoCompression(Compressor):
    """Sends the payload's own bytes, without a header (zero copies)."""

    codec_id = 0
    lossless = True
    fixed_size = True

    def compress(self, x_P: torch.Tensor) -> Wire:
        P = x_P.shape[0]
        data = reinterpret(x_P, torch.uint8, -1)
        return Wire(data, [data.numel() // P if P else 0] * P)

    def wire_bytes(self, spec: SliceSpec) -> int:
        return spec.nbytes

    def decompress(self, wire: Wire, spec: SliceSpec) -> torch.Tensor:
        check_sizes(wire, "uncompressed payload", spec.nbytes)
        return reinterpret(wire.data, spec.dtype, len(wire.sizes), *spec.shape)

    def compress_rows(self, x_NM: torch.Tensor, rows: list[int]) -> Wire:
        row_bytes = x_NM[0].numel() * x_NM.element_size() if len(x_NM) else 0
        return Wire(reinterpret(x_NM, torch.uint8, -1), [n * row_bytes for n in rows])

    def decompress_rows(self, wire: Wire, specs: list[SliceSpec]) -> torch.Tensor:
        expected = [spec.nbytes for spec in specs]
        if list(wire.sizes) != expected or sum(expected) != wire.data.numel():
            raise CorruptPayloadError(
                f"uncompressed ragged payload: expected slices of {expected[:8]} bytes, got "
                f"{list(wire.sizes)[:8]} over {wire.data.numel()} bytes (truncated, oversized "
                "or corrupt payload)")
        row_shape = specs[0].shape[1:]
        return reinterpret(wire.data, specs[0].dtype, sum(s.shape[0] for s in specs), *row_shape)
