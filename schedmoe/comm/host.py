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

# While the sync auditor counts (tools/syncs.py): id -> weak reference of every live host
# tensor (a WeakSet would compare tensors elementwise). Nothing is kept otherwise: a weak
# reference makes torch keep a tensor's Python object alive beside its C++ one, which may then
# be freed from a backend thread as the interpreter exits (a "terminate called" abort).
_HOST_TENSORS: dict[int, weakref.ref] | None = None


def to_device(values: Sequence[int] | torch.Tensor, device: torch.device,
              dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """`values` (host ints or a host tensor) as a tensor on `device`, without a stream sync."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host if host.device == device else host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


_COPY_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


class HostCopy:
    """The host copy of a device tensor, started now and read later without a device sync.
    On CUDA the copy runs on a side stream of its own (as Megatron copies its split sizes), so
    that kernels queued after it on the current stream do not wait for it, and lands in pinned
    memory; an event marks its arrival."""

    def __init__(self, t: torch.Tensor) -> None:
        self._event = None
        if t.device.type == "cuda":
            side = _COPY_STREAMS.setdefault(t.device, torch.cuda.Stream(t.device))
            side.wait_stream(torch.cuda.current_stream(t.device))  # t is computed
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            with torch.cuda.stream(side):
                self.host.copy_(t, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record(side)
            t.record_stream(side)  # t's memory stays until the side stream is done with it
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
        return mark_host(self.host)

    def landed(self) -> torch.Tensor:
        """The host tensor of a copy that has landed (`ready()`): reading it never waits."""
        return mark_host(self.host)


def mark_host(t: torch.Tensor) -> torch.Tensor:
    """Label `t` (a tensor on the host by construction) as such, while an audit runs; returns
    it."""
    labels = _HOST_TENSORS
    if labels is not None:
        key = id(t)
        labels[key] = weakref.ref(t, lambda _: labels.pop(key, None))
    return t


def is_host(t: torch.Tensor) -> bool:
    """Whether `t` was labelled by `mark_host` (reading it never syncs a device)."""
    ref = None if _HOST_TENSORS is None else _HOST_TENSORS.get(id(t))
    return ref is not None and ref() is t


def label_host_tensors(on: bool) -> None:
    """Start (a fresh record) or stop labelling host tensors: the sync auditor's switch."""
    global _HOST_TENSORS
    _HOST_TENSORS = {} if on else None
