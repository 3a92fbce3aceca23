"""Host <-> device traffic that never stalls the device.

- `to_device`: host values onto the device; on CUDA through pinned memory and a non-blocking
  copy (a plain `.to("cuda")` from pageable memory synchronises the stream).
- `HostCopy`: a device value's copy on the host, started at once (non-blocking, pinned, an
  event behind it on CUDA) and read when ready: `ready()` polls, `value()` waits only for it.
  Deferred checks (ops/codecs/checks.py) and split sizes read this way.

On CPU both are plain tensors (no copy at all). `mark_host` labels a tensor that lives on the
host by construction (a host copy, the result of a collective run on a CPU backend) and
`is_host` tells the sync auditor (tools/syncs.py) that reading it is not a device sync.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch

# id -> weak reference of every live host tensor (a WeakSet would compare tensors elementwise).
_HOST_TENSORS: dict[int, weakref.ref] = {}


def to_device(values: Sequence[int] | torch.Tensor, device: torch.device,
              dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """`values` (host ints or a host tensor) as a tensor on `device`, without a stream sync."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host if host.device == device else host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """The host copy of a device tensor, started now and read later without a device sync."""

    def __init__(self, t: torch.Tensor) -> None:
        self._event = None
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self.host = t.detach()
        mark_host(self.host)

    def ready(self) -> bool:
        """Whether the copy has landed (always on CPU)."""
        return self._event is None or self._event.query()

    def value(self) -> torch.Tensor:
        """The host tensor, waiting for this copy alone if it has not landed yet."""
        if self._event is not None:
            self._event.synchronize()
        return self.host


def mark_host(t: torch.Tensor) -> torch.Tensor:
    """Label `t` (a tensor on the host by construction) as such; returns it."""
    key = id(t)
    _HOST_TENSORS[key] = weakref.ref(t, lambda _: _HOST_TENSORS.pop(key, None))
    return t


def is_host(t: torch.Tensor) -> bool:
    """Whether `t` was labelled by `mark_host` (reading it never syncs a device)."""
    ref = _HOST_TENSORS.get(id(t))
    return ref is not None and ref() is t
