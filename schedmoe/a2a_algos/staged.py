"""The staged all-to-all: device -> pinned host -> (host exchange) -> device, registered as
`staged`.

How an exchange moves without GPUDirect RDMA: each rank copies its payload to pinned host
memory on a copy stream (a copy engine), the hosts exchange it (the group's CPU backend, gloo),
and the result is copied back on a copy stream. On one GPU there is no host exchange, but the
two PCIe copies are a real transfer, queued at issue without any host wait, that a pipelined
schedule can overlap with expert compute: the project's one-GPU stand-in for a network.

Host syncs (the algorithm needs them): on several ranks, `wait()` waits for the copy to the
host to land before the host exchange reads it. On one rank, none. On CPU tensors the stage
is a host copy and the exchange is gloo's, with `all_to_all_single` semantics throughout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..comm.groups import backend_of, collective
from ..errors import ConfigError
from ..registry import register_a2a
from .base import A2AAlgorithm, A2AHandle

_COPY_STREAMS: dict[tuple[torch.device, str], "torch.cuda.Stream"] = {}


def _copy_stream(device: torch.device, way: str) -> "torch.cuda.Stream":
    """A stream for copies one way ("d2h" or "h2d"), kept per device: copy engines run
    both ways at once."""
    return _COPY_STREAMS.setdefault((device, way), torch.cuda.Stream(device))


@register_a2a("staged")
class StagedA2A(A2AAlgorithm):
    """device -> pinned host -> gloo all_to_all_single -> device (module docstring)."""

    stages_alone = True  # a one-rank group still moves its payload (A2AAlgorithm.start)

    def _start(self, x: torch.Tensor, send: list[int], recv: list[int],
               even: bool) -> A2AHandle:
        if x.device.type != "cuda":
            host = x.clone()  # the "host copy" of a host tensor
            return A2AHandle(lambda: self._host_exchange(host, send, recv))
        here = torch.cuda.current_stream(x.device)
        d2h = _copy_stream(x.device, "d2h")
        d2h.wait_stream(here)  # x is ready
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        with torch.cuda.stream(d2h):
            host.copy_(x, non_blocking=True)
            landed = torch.cuda.Event()
            landed.record(d2h)
        x.record_stream(d2h)
        if not self.group.distributed:  # nothing to swap: back at once, no host wait
            back = self._to_device(host, x.device, landed)
            return A2AHandle(lambda: self._arrived(*back))

        def wait() -> torch.Tensor:
            landed.synchronize()  # host sync: the host exchange reads the host copy
            received = self._host_exchange(host, send, recv)
            return self._arrived(*self._to_device(received, x.device, None))

        return A2AHandle(wait)

    def _host_exchange(self, host: torch.Tensor, send: list[int],
                       recv: list[int]) -> torch.Tensor:
        if not self.group.distributed:
            return host
        if "gloo" not in backend_of(self.group.pg):
            raise ConfigError("the staged exchange swaps host memory and needs a CPU backend "
                              f"on the EP group, which is {backend_of(self.group.pg)}: "
                              "init_process_group('cpu:gloo,cuda:nccl') gives it one")
        out = host.new_empty((sum(recv), *host.shape[1:]))
        with collective("all-to-all (staged)", self.group):
            dist.all_to_all_single(out, host, recv, send, group=self.group.pg)
        return out

    @staticmethod
    def _to_device(host: torch.Tensor, device: torch.device, after: "torch.cuda.Event | None"
                   ) -> tuple[torch.Tensor, "torch.cuda.Event"]:
        """Queue the copy back on the h2d stream (after the event `after`, if any); returns the
        device tensor and the event of its arrival."""
        h2d = _copy_stream(device, "h2d")
        out = torch.empty(host.shape, dtype=host.dtype, device=device)
        if after is not None:
            h2d.wait_event(after)
        with torch.cuda.stream(h2d):
            out.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(h2d)
        out.record_stream(h2d)
        return out, done

    @staticmethod
    def _arrived(out: torch.Tensor, done: "torch.cuda.Event") -> torch.Tensor:
        """`out` for the current stream, which waits for its arrival (no host wait)."""
        torch.cuda.current_stream(out.device).wait_event(done)
        return out
