"""Helpers for testing code that uses schedmoe on several ranks.

    from schedmoe.tools.testing import run_ranks

    def check(rank, world):
        layer = schedmoe.MoELayer(16, 4, 32)
        return layer(torch.randn(8, 16)).shape

    assert run_ranks(check, 2) == [torch.Size([8, 16])] * 2
"""

from __future__ import annotations

from typing import Any, Callable

from .launch import RemoteError, spawn


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
              collective_timeout: float = 10.0, return_exceptions: bool = False) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` local gloo ranks; see launch.spawn.

    The collective timeout is short (10 s) so that a bug fails the test instead of hanging it;
    `fn` must be importable (defined at module level).
    """
    return spawn(fn, world_size, args, backend="gloo", timeout=timeout,
                 collective_timeout=collective_timeout, return_exceptions=return_exceptions)


__all__ = ["run_ranks", "RemoteError"]
