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

import itertools
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ...comm.host import to_device
from ...errors import SchedMoEError
from ...registry import register_compressor
from .checks import deferring, post

MAGIC = b"SMW1"
HEADER = struct.Struct("<4sBBBBQQQ")  # magic, version, codec, dtype, reserved, rows, cols, body
HEADER_BYTES = HEADER.size  # 32
ALIGN = 8
HEADER_CACHE = 256  # device headers kept per codec (ragged rows make new shapes every call)

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


def _row_geometry(x_NM: torch.Tensor) -> tuple[tuple[int, ...], int]:
    """The shape of one row of `x_NM` and how many codec rows (of its last dim) it spans."""
    row_shape = tuple(x_NM.shape[1:]) or (1,)
    per = 1
    for d in row_shape[:-1]:
        per *= d
    return row_shape, per


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


class FixedSizeCodec(Compressor):
    """A codec whose every slice encodes to the same number of bytes: header + body, built for
    all P slices at once. Subclasses define the body."""

    fixed_size = True

    def _header_error(self, heads_PH: torch.Tensor, specs: list[SliceSpec],
                      sizes: list[int]) -> CorruptPayloadError:
        """The error for the first slice whose header is not the expected one (slice p holds
        `specs[p]` in `sizes[p]` bytes). Reads the headers on the host: the error path only."""
        heads = heads_PH.cpu().numpy()
        for p, (spec, size) in enumerate(zip(specs, sizes)):
            try:
                check_header(bytes(heads[p]), self.codec_id, spec, size,
                             f"slice {p} (from rank {p})")
            except CorruptPayloadError as error:
                return error
        return CorruptPayloadError(f"{type(self).__name__}: a slice header changed on the way")

    @abstractmethod
    def body_bytes(self, spec: SliceSpec) -> int:
        """Unpadded body size of one slice."""

    @abstractmethod
    def encode_body(self, x_PRC: torch.Tensor) -> torch.Tensor:
        """uint8 [P, body_bytes] for the rows of every slice."""

    @abstractmethod
    def decode_body(self, body_PB: torch.Tensor, spec: SliceSpec) -> torch.Tensor:
        """float [P, R, C] from the bodies (body_PB may carry trailing padding)."""

    def section_widths(self, cols: int) -> list[int] | None:
        """A row-wise codec's body is sections of `width` bytes a row, each section in turn,
        row-major: their widths. None (the default): the body is not row-wise, and ragged rows
        are compressed destination by destination."""
        return None

    def sections(self, x_RC: torch.Tensor) -> list[torch.Tensor]:
        """The body of rows `x_RC` as its sections, uint8 `[R, width]` each."""
        raise NotImplementedError(f"{type(self).__name__} has section widths but no sections")

    def from_sections(self, sections: list[torch.Tensor], cols: int) -> torch.Tensor:
        """float `[R, C]` from `sections(x_RC)`."""
        raise NotImplementedError(f"{type(self).__name__} has sections but no inverse")

    def wire_bytes(self, spec: SliceSpec) -> int:
        return HEADER_BYTES + pad_to_align(self.body_bytes(spec))

    def header(self, spec: SliceSpec, body: int, device: torch.device) -> torch.Tensor:
        """The header of a slice of `spec`, on `device`: made once per shape and device and
        sent without a sync (a copy from the host per slice would stall the stream). Ragged
        rows change shape every call, so the cache is bounded."""
        if torch.compiler.is_compiling():  # a constant of the graph; no state changes in a trace
            return torch.tensor(header_ints(self.codec_id, spec, body), dtype=torch.uint8,
                                device=device)
        cache = self.__dict__.setdefault("_headers", {})
        key = (spec, body, device)
        if key not in cache:
            if len(cache) >= HEADER_CACHE:
                cache.clear()
            cache[key] = to_device(as_uint8(header_bytes(self.codec_id, spec, body)), device)
        return cache[key]

    def compress_rows(self, x_NM: torch.Tensor, rows: list[int]) -> Wire:
        """All destinations in one pass where the body is row-wise: the rows are encoded
        together, then each destination's header and padding go around its rows (one cat)."""
        row_shape, per = _row_geometry(x_NM)
        if self.section_widths(row_shape[-1]) is None:
            return super().compress_rows(x_NM, rows)
        sections = self.sections(x_NM.reshape(-1, row_shape[-1]))
        pad = torch.zeros(ALIGN, dtype=torch.uint8, device=x_NM.device)
        pieces, sizes, at = [], [], 0
        for n in rows:
            spec = SliceSpec((n, *row_shape), x_NM.dtype)
            body = pad_to_align(self.body_bytes(spec))
            pieces.append(self.header(spec, body, x_NM.device))
            pieces += [section[at * per:(at + n) * per].reshape(-1) for section in sections]
            pieces.append(pad[:body - self.body_bytes(spec)])
            sizes.append(HEADER_BYTES + body)
            at += n
        return Wire(torch.cat(pieces), sizes)

    def decompress_rows(self, wire: Wire, specs: list[SliceSpec]) -> torch.Tensor:
        """The inverse of `compress_rows`, in one pass where the body is row-wise: every
        slice's header checked at once (on the device, read later inside an exchange), each
        section of every slice gathered with one cat, decoded together."""
        cols = specs[0].cols if specs else 0
        widths = self.section_widths(cols) if specs else None
        if widths is None:
            return super().decompress_rows(wire, specs)
        expected = [self.wire_bytes(spec) for spec in specs]
        if list(wire.sizes) != expected or sum(expected) != wire.data.numel():
            raise CorruptPayloadError(
                f"{type(self).__name__} ragged payload: expected slices of {expected[:8]} bytes, "
                f"got {list(wire.sizes)[:8]} over {wire.data.numel()} bytes (truncated, "
                "oversized or corrupt payload)")
        data, heads, parts = wire.data, [], [[] for _ in widths]
        starts = itertools.accumulate([0] + expected[:-1])
        for spec, start in zip(specs, starts):
            heads.append(data[start:start + HEADER_BYTES])
            at = start + HEADER_BYTES
            for part, width in zip(parts, widths):
                part.append(data[at:at + spec.rows * width].view(spec.rows, width))
                at += spec.rows * width
        heads_PH = torch.stack(heads)
        want_PH = torch.stack([self.header(spec, size - HEADER_BYTES, data.device)
                               for spec, size in zip(specs, expected)])
        bad = (heads_PH != want_PH).any()
        if deferring():
            post(bad, lambda: self._header_error(heads_PH, specs, expected))
        elif bool(bad):
            raise self._header_error(heads_PH, specs, expected)
        x_RC = self.from_sections([torch.cat(part) for part in parts], cols)
        rows = sum(spec.shape[0] for spec in specs)
        return x_RC.to(specs[0].dtype).view(rows, *specs[0].shape[1:])

    def compress(self, x_P: torch.Tensor) -> Wire:
        P = x_P.shape[0]
        spec = SliceSpec(tuple(x_P.shape[1:]), x_P.dtype)
        body = pad_to_align(self.body_bytes(spec))
        head = self.header(spec, body, x_P.device)
        x_PRC = x_P.reshape(P, spec.rows, spec.cols)
        enc_PB = self.encode_body(x_PRC)
        pad = body - enc_PB.shape[1]
        parts = [head.expand(P, HEADER_BYTES), enc_PB]
        if pad:
            parts.append(enc_PB.new_zeros(P, pad))
        data = torch.cat(parts, dim=1).view(-1)
        return Wire(data, [HEADER_BYTES + body] * P)

    def decompress(self, wire: Wire, spec: SliceSpec) -> torch.Tensor:
        P = len(wire.sizes)
        size = HEADER_BYTES + pad_to_align(self.body_bytes(spec))
        check_sizes(wire, type(self).__name__, size)
        wire_PB = wire.data.view(P, size)
        heads_PH = wire_PB[:, :HEADER_BYTES]
        bad = (heads_PH != self.header(spec, size - HEADER_BYTES, wire_PB.device)).any()
        if torch.compiler.is_compiling():
            pass  # traced only for an exchange within one process (layer.py runs others eagerly)
        elif deferring():  # checked on the device, read later (ops/codecs/checks.py)
            heads_PH = heads_PH.clone()  # the evidence, should the check fail
            post(bad, lambda: self._header_error(heads_PH, [spec] * P, [size] * P))
        elif bool(bad):
            raise self._header_error(heads_PH, [spec] * P, [size] * P)
        x_PRC = self.decode_body(wire_PB[:, HEADER_BYTES:], spec)
        return x_PRC.to(spec.dtype).view(P, *spec.shape)
