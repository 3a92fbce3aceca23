"""The rider's wire format: one call's agreement record after every slice of its first dispatch
(control/agreement.py says when a record rides instead of being swapped beforehand).

Legend: F integers in one rank's record.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..ops.codecs.compressor import CorruptPayloadError, Wire


class Rider:
    """One call's record riding on the first dispatch exchange: appended to every slice sent,
    split off every slice received and checked before anything is decoded."""

    def __init__(self, record: list[int], conclude: Callable[[torch.Tensor], Any]) -> None:
        self._record_F = torch.tensor(record, dtype=torch.int64)
        self._conclude = conclude
        self.claimed = False
        self.agreed: Any = None  # set once the records have arrived and agree

    def claim(self) -> "Rider | None":
        """Self for the first exchange that asks (the first dispatch), None afterwards."""
        if self.claimed:
            return None
        self.claimed = True
        return self

    def attach(self, wire: Wire) -> Wire:
        """The wire with this rank's record after every slice."""
        record_R = self._record_F.view(torch.uint8).to(wire.data.device)
        pieces = []
        for slice_B in torch.split(wire.data, wire.sizes):
            pieces += [slice_B, record_R]
        return Wire(torch.cat(pieces), [size + record_R.numel() for size in wire.sizes])

    def detach(self, data: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Split the records off the slices received, conclude the agreement from them (raises
        the typed error or Misguessed), and return the bare payload and its slice sizes."""
        record_bytes = self._record_F.numel() * 8
        if any(size < record_bytes for size in sizes) or sum(sizes) != data.numel():
            raise CorruptPayloadError(f"the first dispatch carries a {record_bytes}-byte record "
                                      f"per slice, got slices of {list(sizes)[:8]} bytes")
        bodies, records = [], []
        for slice_B in torch.split(data, sizes):
            bodies.append(slice_B[:-record_bytes])
            records.append(slice_B[-record_bytes:])
        # A host sync on GPUs, which the algorithm needs: nothing is decoded before the check.
        records_WF = torch.stack(records).cpu().view(torch.int64)
        self.agreed = self._conclude(records_WF)
        return torch.cat(bodies), [size - record_bytes for size in sizes]
