"""Payload checks that run on the device and are read later, so that decoding never waits for
the host (a `bool(...)` of a device tensor stalls the stream).

Inside `deferred()` (the exchanges enter it around every decode, exchange/send.py) a codec
posts each check as a device flag, True if the payload is bad, with a function that builds the
`CorruptPayloadError` from the evidence it kept; outside, codecs check at once (the standalone
API). The flags' host copies start at once; `failure()` reads those that have landed: a layer
asks at its next call and reports the error through its agreement (so it is raised on every
rank, one call late), and `last_stats` asks, waiting, before answering.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import torch

from ...comm.host import HostCopy

_local = threading.local()
_lock = threading.Lock()
_posted: list[tuple[HostCopy, Callable[[], Exception]]] = []


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Codecs called in this block post their checks instead of reading them on the host."""
    before = getattr(_local, "deferring", False)
    _local.deferring = True
    try:
        yield
    finally:
        _local.deferring = before


def deferring() -> bool:
    return getattr(_local, "deferring", False)


def post(bad: torch.Tensor, explain: Callable[[], Exception]) -> None:
    """Record a device check: `bad` (0-dim bool) is True if it failed; `explain()` builds the
    error then (it may read the evidence on the host: it runs only on failure)."""
    flag = HostCopy(bad.reshape(()))
    with _lock:
        _posted.append((flag, explain))


def failure(wait: bool = False) -> Exception | None:
    """The first failed check among those read now, or None; forgets every check it read.
    Without `wait`, checks whose flag has not reached the host yet stay for the next time."""
    with _lock:
        taken = [entry for entry in _posted if wait or entry[0].ready()]
        _posted[:] = [entry for entry in _posted if entry not in taken]
    for flag, explain in taken:
        if bool(flag.value() if wait else flag.landed()):
            return explain()
    return None


def raise_failure(wait: bool = False) -> None:
    """Raise the first failed check, if any (see `failure`)."""
    error = failure(wait)
    if error is not None:
        raise error


def discard() -> None:
    """Forget every posted check (an error raised on every rank supersedes them)."""
    with _lock:
        _posted.clear()
