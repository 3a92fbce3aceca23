"""A host-sync auditor: counts, on any device (CPU included), every call made by the package
that would make a CUDA device synchronise with the host, with its source line.

    with count_syncs() as audit:
        layer(x).sum().backward()
    print(audit.total, audit.by_line())

Counted: reading a tensor's values on the host (`item`, `tolist`, `bool`/`int`/`float`/index
of a tensor, `numpy`), copies between host and device (`cpu`, `to(device)`: on a CPU run the
auditor cannot tell the host from the device, so every `to` a device counts), waiting for a
host copy (`HostCopy.value`, comm/host.py: the one copy of the split sizes), and ops whose
output shape depends on the data (`nonzero`, `argwhere`, `masked_select`, boolean-mask
indexing, `unique`, `bincount`, `repeat_interleave` without `output_size`). Reading a
`HostCopy` that has landed, or the result of a collective on a CPU backend, is free. Only calls whose nearest caller outside torch is a module
of `schedmoe` count (not the user's own code, not torch's internals). Host-side metadata lives
in Python lists and numpy arrays, which are not counted. On a GPU,
`torch.cuda.set_sync_debug_mode("warn")` reports the same places.
"""

from __future__ import annotations

import collections
import functools
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..comm.host import HostCopy, is_host, label_host_tensors

PACKAGE = str(Path(__file__).resolve().parent.parent)
_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}
_DATA_SHAPED = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
                "bincount"}


def _is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether `name(*args, **kwargs)` (a Tensor method: args[0] is the tensor) would sync.
    Reading a tensor labelled as living on the host (comm/host.py: a `HostCopy`, the result of
    a collective on a CPU backend) does not."""
    if args and isinstance(args[0], torch.Tensor) and is_host(args[0]):
        return False
    if name in _READS or name in _DATA_SHAPED or name == "value":  # value: HostCopy's wait
        return True
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None
    if name == "to":
        target = kwargs.get("device", next((a for a in args[1:] if not isinstance(
            a, (torch.dtype, bool))), None))
        return target is not None and torch.device(target).type == "cpu"
    if name == "__getitem__" and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    return False


def _caller() -> str | None:
    """file:line of the nearest frame outside torch and this module, if in the package."""
    frame = sys._getframe(2)  # 0: here, 1: the wrapper, 2: its caller
    while frame is not None:
        path = frame.f_code.co_filename
        if path != __file__ and "/torch/" not in path and not path.startswith("<"):
            if path.startswith(PACKAGE):
                return f"{Path(path).relative_to(Path(PACKAGE).parent)}:{frame.f_lineno}"
            return None
        frame = frame.f_back
    return None


@dataclass
class SyncAudit:
    """What `count_syncs` saw: (source line, op) of every sync, in order."""

    calls: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.calls)

    def by_line(self) -> dict[str, int]:
        """"file:line op" -> count, most frequent first."""
        counts = collections.Counter(f"{where} {op}" for where, op in self.calls)
        return dict(counts.most_common())


# Where the syncing calls live: torch.Tensor methods and torch functions, wrapped while counting.
_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu",
            "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount",
            "repeat_interleave", "to", "__getitem__")
_FUNCTIONS = ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
              "bincount", "repeat_interleave")


class count_syncs:  # noqa: N801  (a context manager named like a function, as torch's are)
    """Count the package's would-be host syncs while active, in every thread (the autograd
    engine's included): the syncing torch.Tensor methods and torch functions are wrapped for
    the duration. Not reentrant."""

    _lock = threading.Lock()

    def __init__(self) -> None:
        self.audit = SyncAudit()
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> SyncAudit:
        self._lock.acquire()
        label_host_tensors(True)
        for owner, names in ((torch.Tensor, _METHODS), (torch, _FUNCTIONS), (HostCopy, ("value",))):
            for name in names:
                original = getattr(owner, name)
                self._saved.append((owner, name, original))
                setattr(owner, name, self._wrap(name, original))
        return self.audit

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()
        label_host_tensors(False)
        self._lock.release()

    def _wrap(self, name: str, original):
        calls = self.audit.calls

        @functools.wraps(original)
        def counted(*args, **kwargs):
            if _is_sync(name, args, kwargs):
                where = _caller()
                if where is not None:
                    calls.append((where, name))
            return original(*args, **kwargs)

        return counted
