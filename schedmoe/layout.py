"""How the rows a layer exchanges are laid out, and how chunked schedules slice them.

Legend: W ranks in the EP group, n local experts per rank, C capacity (slots per segment),
M model dim, N rows sent by this rank, R rows received.

A segment (w, e) is what one rank sends to local expert e of rank w (send side), or what it
receives from rank w for its own local expert e (receive side). Schedules chunk the capacity:
chunk [lo, hi) holds slots [lo, hi) of every segment, the same on every rank.

- `PaddedLayout` (`ragged=False`, or error feedback at a fixed capacity): every segment
  padded to C slots, tensors `[W, n, C, M]`; slicing is a view, exchanges use even splits.
- `RaggedLayout` (`ragged=True`, dropless or at a fixed capacity): segments hold exactly their
  rows, tensors `[N, M]` (send side) and `[R, M]` (receive side), rows ordered by (rank,
  expert, slot); the capacity C is the largest limit in the group (dropless: the largest
  segment). A chunk's rows are gathered segment by segment and its exchange uses the chunk's
  split sizes; nothing is padded on the wire or in the expert GEMMs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PaddedLayout:
    """Every segment padded to `capacity` slots: `[W, n, C, M]` on both sides."""

    capacity: int
    ragged = False

    def slice(self, x_WnCM: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Slots [lo, hi) of every segment of a send-side tensor."""
        return x_WnCM[:, :, lo:hi].contiguous()

    def cat(self, parts: list[torch.Tensor], bounds: list[tuple[int, int]]) -> torch.Tensor:
        """The send-side tensor from its chunks (inverse of `slice`)."""
        return torch.cat(parts, dim=2)

    def chunk_bytes(self, shape: tuple[int, ...], itemsize: int, lo: int, hi: int) -> int:
        world, experts, _, model_dim = shape
        return world * experts * (hi - lo) * model_dim * itemsize


@dataclass
class RaggedLayout:
    """Segments of exactly their rows. `send_Wn[w, e]`: rows this rank sends to local expert e
    of rank w; `recv_Wn[w, e]`: rows it receives from rank w for its local expert e."""

    send_Wn: torch.Tensor  # int64, CPU
    recv_Wn: torch.Tensor  # int64, CPU
    capacity: int  # the largest segment in the group: chunks split [0, C)
    ragged = True
    _index: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def part(counts_Wn: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Rows of each segment that fall in slots [lo, hi)."""
        return (counts_Wn.clamp(max=hi) - lo).clamp(min=0)

    def rows(self, lo: int, hi: int, side: str) -> list[int]:
        """Rows per rank of chunk [lo, hi): sent to each rank ("send") or received from each
        ("recv")."""
        counts_Wn = self.send_Wn if side == "send" else self.recv_Wn
        return self.part(counts_Wn, lo, hi).sum(dim=1).tolist()

    def index(self, lo: int, hi: int, side: str) -> torch.Tensor:
        """Positions, in the whole side's rows, of the rows of chunk [lo, hi)."""
        key = (lo, hi, side)
        if key not in self._index:
            counts = (self.send_Wn if side == "send" else self.recv_Wn).reshape(-1)
            starts = torch.cumsum(counts, 0) - counts
            self._index[key] = _runs(starts + lo, self.part(counts, lo, hi))
        return self._index[key]

    def slice(self, x_NM: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        if (lo, hi) == (0, self.capacity):
            return x_NM
        return x_NM.index_select(0, self.index(lo, hi, "send").to(x_NM.device))

    def cat(self, parts: list[torch.Tensor], bounds: list[tuple[int, int]]) -> torch.Tensor:
        if len(parts) == 1:
            return parts[0]
        index = torch.cat([self.index(lo, hi, "send") for lo, hi in bounds]).to(parts[0].device)
        return torch.empty_like(torch.cat(parts)).index_copy(0, index, torch.cat(parts))

    def chunk_bytes(self, shape: tuple[int, ...], itemsize: int, lo: int, hi: int) -> int:
        return int(self.part(self.send_Wn, lo, hi).sum()) * shape[-1] * itemsize

    def expert_order(self, lo: int, hi: int) -> tuple[torch.Tensor, list[int]]:
        """For the received rows of chunk [lo, hi) (ordered by source rank, then expert): the
        permutation to expert-major order, and the rows of each local expert."""
        take_Wn = self.part(self.recv_Wn, lo, hi)
        starts_Wn = (torch.cumsum(take_Wn.reshape(-1), 0) - take_Wn.reshape(-1)).view_as(take_Wn)
        return _runs(starts_Wn.t().reshape(-1), take_Wn.t().reshape(-1)), \
            take_Wn.sum(dim=0).tolist()


def _runs(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The concatenation of arange(starts[i], starts[i] + lengths[i]) for every i."""
    run = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    return starts[run] + torch.arange(int(lengths.sum())) - first[run]
