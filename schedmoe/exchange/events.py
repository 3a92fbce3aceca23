"""Events of the exchanges, for the features built on them (`overlap/`): a lower layer tells a
higher one through hooks the higher one subscribes to, never by importing it.

- `started(exchange)`, `arrived(exchange)`: an exchange went on, or came off, this process's
  link (`overlap/link.py` counts them: the gradient chunks of `overlap/grad_sync.py` go out
  while none is in flight).
- `waiting()`: around every blocking wait for data in flight (`overlap/turns.py` hands the
  compute to another micro-batch meanwhile).
- `caller()`: the micro-batch of an interleaved step that is calling, None outside one (a
  layer keeps each caller's stats apart).

Inside a compiled graph (torch.compile) no event is told: the graph runs as a whole.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

import torch

_started: list[Callable[[object], None]] = []
_arrived: list[Callable[[object], None]] = []
_waiting: Callable[[], ContextManager] | None = None
_caller: Callable[[], int | None] | None = None


def on_exchange(started: Callable[[object], None], arrived: Callable[[object], None]) -> None:
    """Call `started(exchange)` and `arrived(exchange)` for every exchange from now on."""
    _started.append(started)
    _arrived.append(arrived)


def on_turns(waiting: Callable[[], ContextManager], caller: Callable[[], int | None]) -> None:
    """Wrap every blocking wait in `waiting()`; `caller()` names the calling micro-batch."""
    global _waiting, _caller
    _waiting, _caller = waiting, caller


def started(exchange: object) -> None:
    if torch.compiler.is_compiling():
        return  # a compiled graph runs whole: no link or turns to tell
    for listener in _started:
        listener(exchange)


def arrived(exchange: object) -> None:
    if torch.compiler.is_compiling():
        return
    for listener in _arrived:
        listener(exchange)


@contextlib.contextmanager
def waiting() -> Iterator[None]:
    if _waiting is None or torch.compiler.is_compiling():
        yield
        return
    with _waiting():
        yield


def caller() -> int | None:
    return None if _caller is None else _caller()
