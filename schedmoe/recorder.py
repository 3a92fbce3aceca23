"""What one layer call did: wall-clock seconds per named op, and bytes per exchange."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch


class StepRecorder:
    """Adds the seconds spent in each named op to `seconds[name]` (use as `with rec("op"):`),
    and the bytes of each exchange before and after compression to `bytes[name]`.

    On CUDA it synchronises around each op so the figure is the op's own time; schedulers that
    overlap ops should time whole phases instead.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.bytes: dict[str, list[int]] = {}  # name -> [payload bytes, wire bytes]
        self._sync = device is not None and device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self._sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def count_bytes(self, name: str, payload: int, wire: int) -> None:
        totals = self.bytes.setdefault(name, [0, 0])
        totals[0] += payload
        totals[1] += wire

    def milliseconds(self) -> dict[str, float]:
        return {name: 1e3 * s for name, s in self.seconds.items()}
