"""Turns: micro-batches that share one rank's compute, handing it over while they wait.

Each micro-batch of an interleaved step (microbatches.py) runs its forward and backward in a
thread of its own, but only the one holding the turn computes. At every exchange wait
(`exchange/send.py`'s `PendingSend.wait` enters `waiting()` through the event hook of
exchange/events.py, installed when this module is imported) the turn passes to the next
micro-batch still running, and the waiting one takes it back, in strict rotation, once the
others have had theirs
and its exchange has arrived. So the order of every op and of every collective depends on the
program alone, never on timing: every rank issues its collectives in the same order, and
gradients accumulate in the same order as running the micro-batches one after the other.

Outside an interleaved step (`index()` is None) `waiting()` does nothing.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from ..exchange import events


class Turns:
    """Strict rotation of the turn among `count` micro-batches; 0 starts."""

    def __init__(self, count: int) -> None:
        self._running = list(range(count))
        self._current = 0
        self._changed = threading.Condition()

    def take(self, index: int) -> None:
        """Block until it is micro-batch `index`'s turn."""
        with self._changed:
            self._changed.wait_for(lambda: self._current == index)

    def hand_over(self, index: int) -> None:
        """`index` gives up the turn to the next micro-batch still running (itself if none)."""
        with self._changed:
            at = self._running.index(index)
            self._current = self._running[(at + 1) % len(self._running)]
            self._changed.notify_all()

    def finish(self, index: int) -> None:
        """`index` is done (returned or raised): the turn moves on without it."""
        with self._changed:
            at = self._running.index(index)
            self._running.pop(at)
            if self._running and self._current == index:
                self._current = self._running[at % len(self._running)]
            self._changed.notify_all()


_local = threading.local()  # the Turns and micro-batch index of a micro-batch thread


def index() -> int | None:
    """The micro-batch this thread runs in an interleaved step; None outside one."""
    return getattr(_local, "index", None)


@contextmanager
def playing(turns: Turns, micro_batch: int) -> Iterator[None]:
    """Run this thread as micro-batch `micro_batch`: wait for its first turn, finish at exit."""
    _local.turns, _local.index = turns, micro_batch
    turns.take(micro_batch)
    try:
        yield
    finally:
        turns.finish(micro_batch)
        _local.turns = _local.index = None


@contextmanager
def holding() -> Iterator[None]:
    """Keep the turn inside, waits included: a backward on lanes that overlap, which must
    accumulate its gradients after the previous micro-batch's (microbatches.py)."""
    turns = getattr(_local, "turns", None)
    _local.turns = None
    try:
        yield
    finally:
        _local.turns = turns


@contextmanager
def waiting() -> Iterator[None]:
    """Around a blocking wait for data in flight: another micro-batch computes meanwhile."""
    turns = getattr(_local, "turns", None)
    if turns is None:
        yield
        return
    turns.hand_over(_local.index)
    try:
        yield
    finally:
        turns.take(_local.index)


events.on_turns(waiting, index)
