"""The expert-parallel process group, and collectives that fail with a clear error.

A layer built without an initialised torch.distributed runs single-process (world size 1)
and every collective here is the identity.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from ..errors import ConfigError, PeerError
from .host import mark_host, to_device

# Collect cyclic garbage (layers, their process groups and tensors held by a backend) while the
# interpreter is still whole: left to its finalisation, a backend thread that frees the last
# of them can no longer take the GIL, and gloo aborts the process ("terminate called without
# an active exception") after the program has finished.
atexit.register(gc.collect)


@dataclass(frozen=True)
class EPGroup:
    """The ranks that share one layer's experts; `pg is None` means single-process."""

    pg: dist.ProcessGroup | None
    rank: int
    size: int

    @classmethod
    def resolve(cls, group: dist.ProcessGroup | None) -> "EPGroup":
        """`group`, else WORLD when torch.distributed is initialised, else single-process."""
        if group is None:
            if not (dist.is_available() and dist.is_initialized()):
                return cls(None, 0, 1)
            group = dist.group.WORLD
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    @property
    def distributed(self) -> bool:
        return self.pg is not None

    def timeout(self) -> timedelta | None:
        """The collective timeout the group was created with (None if unknown)."""
        if self.pg is None:
            return None
        try:  # no public accessor; every backend's options carry it
            return self.pg._get_backend(torch.device("cpu")).options._timeout
        except (AttributeError, RuntimeError):
            return None

    def describe(self) -> str:
        return f"rank {self.rank} of an EP group of {self.size}"


# What a backend says when a peer died, timed out or never called in (gloo, NCCL, the store).
_PEER_SIGNS = ("timed out", "timeout", "connection", "closed by peer", "reset by peer",
               "broken pipe", "read error", "write error", "remote", "abort", "peer")


@contextlib.contextmanager
def collective(what: str, group: EPGroup) -> Iterator[None]:
    """Turn a backend failure into a typed error: `PeerError` if a peer rank died, timed out or
    never called this collective; `ConfigError` if the backend refused the call itself (a
    tensor on a device the backend does not serve, wrong list or split sizes): not a dead peer."""
    try:
        yield
    except RuntimeError as exc:  # DistBackendError and gloo's errors are RuntimeErrors
        said = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        network = isinstance(exc, (dist.DistNetworkError, dist.DistStoreError))
        if network or any(sign in str(exc).lower() for sign in _PEER_SIGNS):
            raise PeerError(
                f"{what} failed on {group.describe()}: a peer rank died, timed out or never "
                f"called this collective (backend said: {said}). Check the other ranks' logs "
                "for the first error.") from exc
        raise ConfigError(
            f"{what} was refused by the {backend_of(group.pg)} backend on "
            f"{group.describe()} (backend said: {said}); the call itself does not fit the "
            "process group (tensors on a device it does not serve, or sizes that do not "
            "match)") from exc


def backend_of(pg: dist.ProcessGroup | None) -> str:
    """The group's backend as torch names it: "gloo", "nccl", or several ("cpu:gloo,cuda:nccl")."""
    return "none" if pg is None else str(dist.get_backend(pg))


def serves_cuda(pg: dist.ProcessGroup | None) -> bool:
    """Whether the group's collectives take CUDA tensors (NCCL, alone or beside gloo)."""
    return "nccl" in backend_of(pg)


def collective_device(pg: dist.ProcessGroup | None) -> torch.device:
    """Where small host-side metadata (timings, flags) goes for a collective of this group: the
    CPU when the group has a CPU backend (gloo, also beside NCCL), else the current CUDA device
    (an NCCL-only group rejects CPU tensors)."""
    backend = backend_of(pg)
    if "gloo" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_gather_ints(values: Sequence[int], group: EPGroup, what: str) -> list[list[int]]:
    """Every rank's `values`, by rank. On the group's CPU backend where it has one (gloo, also
    beside NCCL as "cpu:gloo,cuda:nccl"): host ints that never touch a device. On an NCCL-only
    group, through the GPU, read back once (a host sync, which the callers need: they decide
    on the host)."""
    if not group.distributed:
        return [list(values)]
    device = collective_device(group.pg)
    mine = to_device(list(values), device)
    out = [torch.empty_like(mine) for _ in range(group.size)]
    with collective(what, group):
        dist.all_gather(out, mine, group=group.pg)
    gathered = torch.stack(out)
    return (mark_host(gathered) if device.type == "cpu" else gathered).tolist()
