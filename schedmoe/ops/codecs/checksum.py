"""Per-slice checksums around any codec (`MoELayer(verify=True)`).

Legend: P slices, S bytes per slice, N 8-byte words per padded slice.

Each slice the inner codec produces is padded with zeros to a multiple of 8 bytes and followed by
a 24-byte trailer: the inner slice's length, the sum of its 8-byte words and the sum of word i
times (i + 1), both modulo 2^64. Any single flipped bit changes the first sum, a swap of two
words the second. It is computed with tensor ops on the payload's device (no host copy) and
checked on arrival, before the inner codec decodes anything: a mismatch raises
CorruptPayloadError. It is a guard against corruption, not against an adversary.
"""

from __future__ import annotations

import torch

from .compressor import (ALIGN, Compressor, CorruptPayloadError, SliceSpec, Wire, check_sizes,
                         pad_to_align, reinterpret)

TRAILER_BYTES = 24


def _sums(words_PN: torch.Tensor) -> torch.Tensor:
    """int64 [P, 2]: plain and position-weighted sums of each row (wrapping modulo 2^64)."""
    weights_N = torch.arange(1, words_PN.shape[1] + 1, dtype=torch.int64, device=words_PN.device)
    return torch.stack([words_PN.sum(dim=1), (words_PN * weights_N).sum(dim=1)], dim=1)


def _seal(slice_PS: torch.Tensor) -> torch.Tensor:
    """uint8 [P, pad(S) + 24]: the slices, zero padding, and each one's trailer."""
    P, S = slice_PS.shape
    padded_PS = torch.nn.functional.pad(slice_PS, (0, pad_to_align(S) - S))
    words_PN = reinterpret(padded_PS, torch.int64, P, padded_PS.shape[1] // ALIGN)
    length_P1 = torch.full((P, 1), S, dtype=torch.int64, device=slice_PS.device)
    trailer_P3 = torch.cat([length_P1, _sums(words_PN)], dim=1)
    return torch.cat([padded_PS, reinterpret(trailer_P3, torch.uint8, P, TRAILER_BYTES)], dim=1)


def _open(sealed_PS: torch.Tensor, where: str) -> int:
    """Check the trailers of equal-size sealed slices; returns the inner slice length."""
    P, S = sealed_PS.shape
    body = S - TRAILER_BYTES
    trailer_P3 = reinterpret(sealed_PS[:, body:], torch.int64, P, 3)
    words_PN = reinterpret(sealed_PS[:, :body], torch.int64, P, body // ALIGN)
    lengths = trailer_P3[:, 0].tolist()  # host sync: the check needs the values
    good_P = (trailer_P3[:, 1:] == _sums(words_PN)).all(dim=1)
    for p, length in enumerate(lengths):
        if not 0 <= length <= body or pad_to_align(length) != body:
            raise CorruptPayloadError(f"{where}, slice {p}: the checksum trailer declares "
                                      f"{length} bytes in a {body}-byte body (corrupt payload)")
    if not bool(good_P.all()):
        p = int((~good_P).nonzero()[0, 0])
        raise CorruptPayloadError(f"{where}, slice {p} (from rank {p}): checksum mismatch, the "
                                  "payload was corrupted on the way")
    if len(set(lengths)) > 1:
        raise CorruptPayloadError(f"{where}: slices of one size declare different lengths "
                                  f"{lengths[:8]} (corrupt payload)")
    return lengths[0] if lengths else 0


class Checksummed(Compressor):
    """`inner` with a checksum trailer on every slice; name suffix `+verify`."""

    def __init__(self, inner: Compressor) -> None:
        self.inner = inner
        self.codec_id = inner.codec_id
        self.lossless = inner.lossless
        self.fixed_size = inner.fixed_size

    def describe(self) -> str:
        return self.inner.describe() + "+verify"

    def wire_bytes(self, spec: SliceSpec) -> int | None:
        inner = self.inner.wire_bytes(spec)
        return None if inner is None else pad_to_align(inner) + TRAILER_BYTES

    def without_feedback(self) -> Compressor:
        inner = self.inner.without_feedback()
        return self if inner is self.inner else Checksummed(inner)

    def compress(self, x_P: torch.Tensor) -> Wire:
        wire = self.inner.compress(x_P)
        P = len(wire.sizes)
        if len(set(wire.sizes)) <= 1:  # fixed-size codecs: every slice at once
            sealed_PS = _seal(wire.data.view(P, wire.data.numel() // P if P else 0))
            return Wire(sealed_PS.reshape(-1), [sealed_PS.shape[1]] * P)
        pieces = [_seal(piece.view(1, -1)) for piece in torch.split(wire.data, wire.sizes)]
        return Wire(torch.cat([p.view(-1) for p in pieces]), [p.shape[1] for p in pieces])

    def decompress(self, wire: Wire, spec: SliceSpec) -> torch.Tensor:
        where = f"{self.describe()} payload"
        check_sizes(wire, where)
        if any(s < TRAILER_BYTES or (s - TRAILER_BYTES) % ALIGN for s in wire.sizes):
            raise CorruptPayloadError(f"{where}: slice sizes {wire.sizes[:8]} cannot hold a "
                                      "checksum trailer (truncated or corrupt payload)")
        P = len(wire.sizes)
        if len(set(wire.sizes)) <= 1:
            sealed_PS = wire.data.view(P, wire.sizes[0] if P else 0)
            length = _open(sealed_PS, where)
            inner = Wire(sealed_PS[:, :length].reshape(-1), [length] * P)
        else:
            pieces = [piece.view(1, -1) for piece in torch.split(wire.data, wire.sizes)]
            lengths = [_open(piece, f"{where}, slice {p}") for p, piece in enumerate(pieces)]
            inner = Wire(torch.cat([piece[0, :n] for piece, n in zip(pieces, lengths)]), lengths)
        return self.inner.decompress(inner, spec)
