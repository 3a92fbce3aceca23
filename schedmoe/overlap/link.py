"""This process's link as the MoE exchanges use it: how many are in flight, and who wants to
know when none is.

The exchanges report each A2A they issue and each one that arrives (exchange/events.py, to
which this module subscribes when imported). Background
traffic of lower priority (the data-parallel gradient chunks of grad_sync.py) listens and goes
out only while no exchange is in flight, so it fills the link's idle time instead of slowing
the A2As down.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable

from ..exchange import events

_lock = threading.Lock()
# Weak: an exchange abandoned by an exception (never waited for) stops counting once collected.
_in_flight: weakref.WeakSet = weakref.WeakSet()
_listeners: list[Callable[[], None]] = []


def busy() -> bool:
    """Whether an exchange of this process is in flight."""
    return len(_in_flight) > 0


def exchange_started(exchange: object) -> None:
    with _lock:
        _in_flight.add(exchange)


def exchange_arrived(exchange: object) -> None:
    """`exchange` finished; the listeners hear it when it was the last one in flight."""
    with _lock:
        _in_flight.discard(exchange)
        idle = len(_in_flight) == 0
    if idle:
        for listener in list(_listeners):
            listener()


def listen(listener: Callable[[], None]) -> None:
    """Call `listener()` whenever the link goes idle (in the thread that saw it go idle)."""
    _listeners.append(listener)


def unlisten(listener: Callable[[], None]) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


events.on_exchange(exchange_started, exchange_arrived)
