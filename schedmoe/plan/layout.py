"""How the rows a layer exchanges are laid out: decided once per call (`layout_for`), then
asked by every step of the call (plan, encode, chunk, split sizes, experts, decode) instead of
each branching on padded or ragged.

Legend: W ranks in the EP group, n local experts per rank, C capacity (slots per segment),
M model dim, N rows sent by this rank, R rows received, T tokens, E = W * n experts.
P stands for the payload's shape in the layout: `W n C M` padded, `N M` (send side) or `R M`
(receive side) ragged.

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
from torch import nn

from .plans import DispatchPlan, combine, gather, padded_plan, rows_plan, scatter


def layout_for(capacity: int, world: int, local_experts: int, send_counts: list[int] | None,
               counts_WE: torch.Tensor | None, offset: int) -> "PaddedLayout | RaggedLayout":
    """The layout of one call: ragged rows if the agreement swapped every rank's split sizes
    (`counts_WE`: rows each rank sends to each expert), else padded. `send_counts`: this rank's
    own rows per expert, `offset`: its first expert."""
    if counts_WE is None:
        return PaddedLayout(capacity, world, local_experts)
    send_Wn = torch.tensor(send_counts).view(world, local_experts)
    return RaggedLayout(send_Wn, counts_WE[:, offset:offset + local_experts], capacity)


def chunk_bounds(capacity: int, degree: int) -> list[tuple[int, int]]:
    """[lo, hi) capacity slots of each chunk; at most `capacity` chunks (one if C == 0)."""
    parts = max(1, min(degree, capacity))
    base, extra = divmod(capacity, parts)
    bounds, lo = [], 0
    for i in range(parts):
        hi = lo + base + (1 if i < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


@dataclass
class PaddedLayout:
    """Every segment padded to `capacity` slots: `[W, n, C, M]` on both sides."""

    capacity: int
    world: int = 1
    local_experts: int = 1
    ragged = False

    def plan(self, expert_TK: torch.Tensor, weight_TK: torch.Tensor, slot_TK: torch.Tensor,
             counts_E: torch.Tensor, limit: int) -> DispatchPlan:
        return padded_plan(expert_TK, weight_TK, slot_TK, counts_E, limit, self.capacity)

    def encode(self, x_TM: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """The kept tokens, `[W, n, C, M]` (slice w for the experts of rank w)."""
        x_ECM = scatter(x_TM, plan)
        return x_ECM.view(self.world, self.local_experts, self.capacity, x_TM.shape[-1])

    def placeholder(self, model_dim: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
        """Zeros of the payload's shape, for a rank that only takes part in the exchange."""
        return torch.zeros(self.world, self.local_experts, self.capacity, model_dim,
                           dtype=dtype, device=device)

    def decode(self, y_WnCM: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
        y_NM = y_WnCM.reshape(-1, y_WnCM.shape[-1]).index_select(0, plan.slot_N)
        return combine(y_NM, plan, num_tokens)

    def slice(self, x_WnCM: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Slots [lo, hi) of every segment of a send-side tensor."""
        return x_WnCM[:, :, lo:hi].contiguous()

    def cat(self, parts: list[torch.Tensor], bounds: list[tuple[int, int]]) -> torch.Tensor:
        """The send-side tensor from its chunks (inverse of `slice`)."""
        return torch.cat(parts, dim=2)

    def chunk_bytes(self, shape: tuple[int, ...], itemsize: int, lo: int, hi: int) -> int:
        world, experts, _, model_dim = shape
        return world * experts * (hi - lo) * model_dim * itemsize

    def splits(self, lo: int, hi: int, towards_experts: bool) -> None:
        """Row counts of an exchange: none, every slice is the same size."""
        return None

    def run_experts(self, experts: nn.Module, recv_WnCM: torch.Tensor, lo: int,
                    hi: int) -> torch.Tensor:
        """The local experts over every source rank's slots, batched per expert."""
        world, local, capacity, model_dim = recv_WnCM.shape
        dtype = next(experts.parameters(), recv_WnCM).dtype
        x_nXM = recv_WnCM.transpose(0, 1).reshape(local, world * capacity, model_dim)
        y_nXM = experts(x_nXM.to(dtype)).to(recv_WnCM.dtype)
        return y_nXM.view(local, world, capacity, model_dim).transpose(0, 1).contiguous()


@dataclass
class RaggedLayout:
    """Segments of exactly their rows. `send_Wn[w, e]`: rows this rank sends to local expert e
    of rank w; `recv_Wn[w, e]`: rows it receives from rank w for its local expert e."""

    send_Wn: torch.Tensor  # int64, CPU
    recv_Wn: torch.Tensor  # int64, CPU
    capacity: int  # the largest segment in the group: chunks split [0, C)
    ragged = True
    _index: dict = field(default_factory=dict, repr=False)

    def plan(self, expert_TK: torch.Tensor, weight_TK: torch.Tensor, slot_TK: torch.Tensor,
             counts_E: torch.Tensor, limit: int) -> DispatchPlan:
        return rows_plan(expert_TK, weight_TK, slot_TK, counts_E, limit)

    def encode(self, x_TM: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """The kept tokens as `[N, M]` rows, ordered by (rank, expert, slot)."""
        return gather(x_TM, plan)

    def placeholder(self, model_dim: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
        return torch.zeros(int(self.send_Wn.sum()), model_dim, dtype=dtype, device=device)

    def decode(self, y_NM: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
        return combine(y_NM, plan, num_tokens)

    def splits(self, lo: int, hi: int, towards_experts: bool) -> tuple[list[int], list[int]]:
        """Rows per rank of chunk [lo, hi)'s exchange, (sent, received): towards the experts
        (dispatch, combine's gradient) or back (combine, dispatch's gradient)."""
        send, recv = self.rows(lo, hi, "send"), self.rows(lo, hi, "recv")
        return (send, recv) if towards_experts else (recv, send)

    def run_experts(self, experts: nn.Module, recv_RM: torch.Tensor, lo: int,
                    hi: int) -> torch.Tensor:
        """The local experts over the rows received in chunk [lo, hi), expert by expert
        (grouped GEMMs), back in the order they arrived."""
        dtype = next(experts.parameters(), recv_RM).dtype
        perm_R, counts = self.expert_order(lo, hi)
        perm_R = perm_R.to(recv_RM.device)
        y_RM = experts.forward_ragged(recv_RM.index_select(0, perm_R).to(dtype),
                                      counts).to(recv_RM.dtype)
        return torch.empty_like(y_RM).index_copy(0, perm_R, y_RM)

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
