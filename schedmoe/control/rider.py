"""The rider's wire format: one call's agreement record after every slice of its first dispatch
(control/agreement.py says when a record rides instead of being swapped beforehand).

Legend: F integers in one rank's record.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..comm.host import mark_host, to_device
from ..ops.codecs.compressor import CorruptPayloadError, Wire


def ride_costs_no_sync(payload_device: str, collective_device: str) -> bool:
    """Whether a record riding on a payload on `payload_device` costs the device no more than
    an all-gather of it on `collective_device` (comm/groups.py). A record riding on a GPU
    payload is read back from the GPU (a host sync); a group with a CPU backend (gloo, or
    "cpu:gloo,cuda:nccl") all-gathers it on the host without touching the device. So GPU
    payloads ride only on NCCL-only groups, where the all-gather costs the same sync."""
    return payload_device != "cuda" or collective_device != "cpu"


class Rider:
    """One call's record riding on the first dispatch exchange: appended to every slice sent,
    split off every slice received, and concluded once the call's exchanges are issued, before
    anything is decoded (`conclude`)."""

    def __init__(self, record: list[int], conclude: Callable[[list[list[int]]], Any]) -> None:
        self._record_F = torch.tensor(record, dtype=torch.int64)
        self._conclude = conclude
        self._records_WB: torch.Tensor | None = None  # every rank's record, as it arrived
        self.claimed = False
        self.agreed: Any = None  # set by `conclude` once the records agree

    def claim(self) -> "Rider | None":
        """Self for the first exchange that asks (the first dispatch), None afterwards."""
        if self.claimed:
            return None
        self.claimed = True
        return self

    @property
    def arrived(self) -> bool:
        return self._records_WB is not None

    def attach(self, wire: Wire) -> Wire:
        """The wire with this rank's record after every slice."""
        record_R = to_device(self._record_F.view(torch.uint8), wire.data.device)
        pieces = []
        for slice_B in torch.split(wire.data, wire.sizes):
            pieces += [slice_B, record_R]
        return Wire(torch.cat(pieces), [size + record_R.numel() for size in wire.sizes])

    def detach(self, data: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Split the records off the slices received (kept, on the device, for `conclude`),
        and return the bare payload and its slice sizes."""
        record_bytes = self._record_F.numel() * 8
        if any(size < record_bytes for size in sizes) or sum(sizes) != data.numel():
            raise CorruptPayloadError(f"the first dispatch carries a {record_bytes}-byte record "
                                      f"per slice, got slices of {list(sizes)[:8]} bytes")
        bodies, records = [], []
        for slice_B in torch.split(data, sizes):
            bodies.append(slice_B[:-record_bytes])
            records.append(slice_B[-record_bytes:])
        self._records_WB = torch.stack(records)
        return torch.cat(bodies), [size - record_bytes for size in sizes]

    def conclude(self) -> Any:
        """What the records say (raises the typed error or Misguessed, on every rank alike).
        Read once the call's exchanges are issued, so the device has the whole call queued."""
        records_WF = self._records_WB.view(torch.int64)
        if records_WF.device.type == "cpu":
            mark_host(records_WF)  # a CPU payload: host memory, no device to wait for
        # On a GPU (records ride there only on NCCL-only groups, MoELayer._may_ride) a host
        # sync, which the algorithm needs: no output leaves the layer before every rank knows
        # that every record agrees (deferring it by a call would let a bad rank's gradients
        # reach the optimizer).
        rows = records_WF.tolist()
        self.agreed = self._conclude(rows)
        return self.agreed
