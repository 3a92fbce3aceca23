"""Fixed-size codecs: every slice encodes to the same number of bytes for its shape, a header
and a body built for all P slices at once (the cast and quantising codecs derive from it).

Legend: P slices (destination ranks), R rows per slice, C values per row, H header bytes,
B body bytes.

Headers are made once per slice shape and device and checked on the device; inside an exchange
the check is read later (checks.py). Codecs whose body is row-wise (`section_widths`) encode
the ragged rows of every destination in one pass.
"""

from __future__ import annotations

import itertools
import math
from abc import abstractmethod

import torch

from ...comm.host import to_device
from ...streams.lanes import lane_key
from .checks import deferring, post
from .compressor import (ALIGN, HEADER_BYTES, Compressor, CorruptPayloadError, SliceSpec, Wire,
                         as_uint8, check_header, check_sizes, header_bytes, header_ints,
                         pad_to_align)

HEADER_CACHE = 256  # device headers kept per codec (ragged rows make new shapes every call)


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

    def _check_headers(self, heads_PH: torch.Tensor, want_PH: torch.Tensor,
                       specs: list[SliceSpec], sizes: list[int]) -> None:
        """Compare the received headers with the expected ones on the device: inside an
        exchange the result is posted and read later (checks.py), outside it is raised at once;
        inside a compiled graph nothing is checked (a graph cannot raise on the host)."""
        if torch.compiler.is_compiling():
            return
        bad = (heads_PH != want_PH).any()
        if deferring():
            heads_PH = heads_PH.clone()  # the evidence, should the check fail
            post(bad, lambda: self._header_error(heads_PH, specs, sizes))
        elif bool(bad):
            raise self._header_error(heads_PH, specs, sizes)

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

    def decode_rows(self, data: torch.Tensor, specs: list[SliceSpec],
                    starts: list[int]) -> torch.Tensor | None:
        """Every slice's rows decoded at once from the wire `data` (slice p at byte
        `starts[p]`, its headers checked), in the specs' dtype; None (the default): decode
        the sections with torch ops."""
        return None

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
        key = (spec, body, device, lane_key(device))  # made by a copy on the current lane
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
        want_PH = torch.stack([self.header(spec, size - HEADER_BYTES, data.device)
                               for spec, size in zip(specs, expected)])
        self._check_headers(torch.stack(heads), want_PH, specs, expected)
        rows = sum(spec.shape[0] for spec in specs)
        x_NM = self.decode_rows(data, specs, list(itertools.accumulate([0] + expected[:-1])))
        if x_NM is not None:  # one pass of a kernel (quant.py on CUDA)
            return x_NM.view(rows, *specs[0].shape[1:])
        x_RC = self.from_sections([torch.cat(part) for part in parts], cols)
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
        self._check_headers(wire_PB[:, :HEADER_BYTES],
                            self.header(spec, size - HEADER_BYTES, wire_PB.device),
                            [spec] * P, [size] * P)
        x_PRC = self.decode_body(wire_PB[:, HEADER_BYTES:], spec)
        return x_PRC.to(spec.dtype).view(P, *spec.shape)


def _row_geometry(x_NM: torch.Tensor) -> tuple[tuple[int, ...], int]:
    """The shape of one row of `x_NM` and how many codec rows (of its last dim) it spans."""
    row_shape = tuple(x_NM.shape[1:]) or (1,)
    return row_shape, math.prod(row_shape[:-1])
