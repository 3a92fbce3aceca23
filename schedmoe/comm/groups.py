"""The expert-parallel process group, and collectives that fail with a clear error.

A layer built without an initialised torch.distributed runs single-process (world size 1)
and every collective here is the identity.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from ..errors import PeerError


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


@contextlib.contextmanager
def collective(what: str, group: EPGroup) -> Iterator[None]:
    """Turn a backend failure (dead peer, timeout, peer that never called in) into PeerError."""
    try:
        yield
    except RuntimeError as exc:  # DistBackendError and gloo's errors are RuntimeErrors
        raise PeerError(
            f"{what} failed on {group.describe()}: a peer rank died, timed out or never "
            f"called this collective (backend said: {str(exc).strip().splitlines()[0]}). "
            "Check the other ranks' logs for the first error."
        ) from exc


def all_gather_ints(values: Sequence[int], group: EPGroup, device: torch.device,
                    what: str) -> torch.Tensor:
    """Every rank's `values` as a [W, len(values)] int64 tensor (on CPU)."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    if not group.distributed:
        return mine.unsqueeze(0).cpu()
    out = [torch.empty_like(mine) for _ in range(group.size)]
    with collective(what, group):
        dist.all_gather(out, mine, group=group.pg)
    return torch.stack(out).cpu()
