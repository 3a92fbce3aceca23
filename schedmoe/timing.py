"""Wall-clock timing of named ops, accumulated over one layer call."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch


class OpTimer:
    """Adds the seconds spent in each named op to `seconds[name]`.

    On CUDA it synchronises around each op so the figure is the op's own time; schedulers that
    overlap ops should time whole phases instead.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.seconds: dict[str, float] = {}
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

    def milliseconds(self) -> dict[str, float]:
        return {name: 1e3 * s for name, s in self.seconds.items()}
