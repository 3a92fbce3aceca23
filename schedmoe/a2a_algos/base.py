"""The interface every all-to-all algorithm implements, and its autograd wrapper.

An algorithm has exactly the semantics of `torch.distributed.all_to_all_single`: the input is
split on dim 0 into one slice per rank (evenly, or by `input_splits`), slice j goes to rank j,
and the output holds the slices received, ordered by source rank (sizes `output_splits`).
Algorithms differ only in how the bytes travel, so each can be checked against the flat one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ..comm.groups import EPGroup, collective
from ..errors import A2AError
from ..comm.topology import Topology, topology
from .segments import permute

Splits = Sequence[int] | None


class A2AHandle:
    """An exchange in flight; `wait()` returns the received tensor."""

    def __init__(self, wait_fn: Callable[[], torch.Tensor]) -> None:
        self._wait_fn = wait_fn
        self._result: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            self._result = self._wait_fn()
        return self._result


class A2AAlgorithm(ABC):
    """One way of doing all_to_all_single over an EP group. Subclasses implement `_start`.

    Topology-aware algorithms (`uses_topology = True`) see `self.topology` and work on node
    positions (`topology.py`): `start` hands them the payload in position order and puts what
    they return back in rank order, a no-op when every node's ranks are consecutive.
    `local_size`: None finds the nodes from the hosts; an int numbers them as torchrun does.
    A `traceable` algorithm is one all_to_all_single, which torch.compile traces as a
    functional collective (exchange/send.py).
    """

    uses_topology = False
    traceable = False
    stages_alone = False  # moves the payload even on a one-rank group (staged.py)

    def __init__(self, group: EPGroup, local_size: int | None = None) -> None:
        self.group = group
        self.local_size = local_size
        self._topology: Topology | None = None

    def describe(self) -> str:
        """Class and settings: a change in place shows here (the layer re-reads it)."""
        return f"{type(self).__name__}(local_size={self.local_size})"

    @property
    def topology(self) -> Topology:
        """Node layout and sub-communicators, created on first use (a collective step)."""
        if self._topology is None:
            self._topology = topology(self.group, self.local_size)
        return self._topology

    def start(self, x: torch.Tensor, output_splits: Splits = None,
              input_splits: Splits = None) -> A2AHandle:
        """Issue the exchange of `x` and return a handle without waiting for it."""
        send, recv = self.split_sizes(x, output_splits, input_splits)
        if not self.group.distributed and not self.stages_alone:
            return A2AHandle(lambda: x)
        even = input_splits is None and output_splits is None
        if not self.uses_topology or self.topology.in_rank_order:
            return self._start(x.contiguous(), send, recv, even)
        order = self.topology.order  # position -> group rank
        send_p, recv_p = [send[r] for r in order], [recv[r] for r in order]
        handle = self._start(permute(x, send, order), send_p, recv_p, even)
        return A2AHandle(lambda: permute(handle.wait(), recv_p, self.topology.positions))

    @abstractmethod
    def _start(self, x: torch.Tensor, send: list[int], recv: list[int],
               even: bool) -> A2AHandle:
        """Issue the exchange on a distributed group: `send[j]` rows of `x` go to rank j,
        `recv[j]` rows come from rank j (`even`: no split sizes were given)."""

    def exchange(self, x: torch.Tensor, output_splits: Splits = None,
                 input_splits: Splits = None) -> torch.Tensor:
        """Blocking form of `start`."""
        return self.start(x, output_splits, input_splits).wait()

    def split_sizes(self, x: torch.Tensor, output_splits: Splits,
                    input_splits: Splits) -> tuple[list[int], list[int]]:
        """(send, recv) rows per rank, even splits filled in, after checking the splits
        against `x` and the group."""
        world = self.group.size
        for label, splits in (("input_splits", input_splits), ("output_splits", output_splits)):
            if splits is not None and (len(splits) != world or any(s < 0 for s in splits)):
                raise A2AError(f"{label} must be {world} non-negative sizes, got {list(splits)}")
        if input_splits is None and x.shape[0] % world:
            raise A2AError(
                f"dim 0 of the input ({x.shape[0]}) is not divisible by the world size ({world}); "
                "pass input_splits"
            )
        if input_splits is not None and sum(input_splits) != x.shape[0]:
            raise A2AError(f"input_splits sum to {sum(input_splits)}, dim 0 is {x.shape[0]}")
        even = [x.shape[0] // world] * world
        return (even if input_splits is None else list(input_splits),
                even if output_splits is None else list(output_splits))


def start_all_to_all(x: torch.Tensor, recv: list[int], send: list[int], group: EPGroup,
                     what: str) -> Callable[[], torch.Tensor]:
    """Issue all_to_all_single on `group`; returns a function that waits and gives the output."""
    if group.size == 1:
        return lambda: x
    out = x.new_empty((sum(recv), *x.shape[1:]))
    with collective(what, group):
        work = dist.all_to_all_single(out, x, recv, send, group=group.pg, async_op=True)

    def wait() -> torch.Tensor:
        with collective(what, group):
            work.wait()
        return out

    return wait


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, algo, output_splits, input_splits):  # type: ignore[override]
        ctx.algo, ctx.output_splits, ctx.input_splits = algo, output_splits, input_splits
        return algo.exchange(x.contiguous(), output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        # The gradient of an exchange is the reverse exchange.
        grad_in = ctx.algo.exchange(grad_out.contiguous(), ctx.input_splits, ctx.output_splits)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, algo: A2AAlgorithm, output_splits: Splits = None,
               input_splits: Splits = None) -> torch.Tensor:
    """Differentiable all_to_all_single through `algo`."""
    splits_out = None if output_splits is None else list(output_splits)
    splits_in = None if input_splits is None else list(input_splits)
    return _AllToAll.apply(x, algo, splits_out, splits_in)
