"""How the rows a layer exchanges are laid out: decided once per call (`layout_for`), then
asked by every step of the call (plan, encode, chunk, split sizes, experts, decode) instead of
each branching on padded or ragged.

Legend: W ranks in the EP group, n local experts per rank, C capacity (slots per segment),
M model dim, N rows sent by this rank, R rows received, T tokens, E = W * n experts.
P stands for the payload's shape in the layout: `W n C M` padded, `N M` (send side) or `R M`
(receive side) ragged.

A segment (w, e) is what one rank sends to local expert e of rank w (send side), or what it
receives from rank w for its own local expert e (receive side). Schedules chunk the capacity:
chunk [lo, hi) of [0, C) holds slots [lo, hi) of every padded segment, and the same share of
every ragged segment's rows (rows [floor(lo n / C), floor(hi n / C)) of a segment of n), so
ragged chunks are equal in rows however skewed the routing; the same on every rank.

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

import numpy as np
import torch
from torch import nn

from ..comm.host import to_device
from .plans import DispatchPlan, combine, gather, padded_plan, rows_plan, scatter


def layout_for(capacity: int, world: int, local_experts: int, send_counts: list[int] | None,
               counts_WE: np.ndarray | None, offset: int) -> "PaddedLayout | RaggedLayout":
    """The layout of one call: ragged rows if the agreement swapped every rank's split sizes
    (`counts_WE`: rows each rank sends to each expert), else padded. `send_counts`: this rank's
    own rows per expert, `offset`: its first expert."""
    if counts_WE is None:
        return PaddedLayout(capacity, world, local_experts)
    send_Wn = np.asarray(send_counts, dtype=np.int64).reshape(world, local_experts)
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
        y_XM = y_WnCM.reshape(-1, y_WnCM.shape[-1])
        # A dropped pair reads some row (its slot E * C clamped) and adds it with weight 0.
        y_NM = y_XM.index_select(0, plan.slot_N.clamp(max=max(len(y_XM) - 1, 0)))
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
    of rank w; `recv_Wn[w, e]`: rows it receives from rank w for its local expert e. Both are
    host metadata (numpy, from the one copy of the split sizes a call makes): every index the
    device needs is computed on the host and sent without a sync (comm/host.py)."""

    send_Wn: np.ndarray  # int64
    recv_Wn: np.ndarray  # int64
    capacity: int  # the largest segment in the group: chunks split [0, C)
    ragged = True
    _index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.send_Wn = np.asarray(self.send_Wn, dtype=np.int64)
        self.recv_Wn = np.asarray(self.recv_Wn, dtype=np.int64)

    def plan(self, expert_TK: torch.Tensor, weight_TK: torch.Tensor, slot_TK: torch.Tensor,
             counts_E: torch.Tensor, limit: int) -> DispatchPlan:
        return rows_plan(expert_TK, weight_TK, slot_TK, counts_E, limit,
                         int(self.send_Wn.sum()))

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
        perm_R = self._on(recv_RM.device, ("order", lo, hi), perm_R)
        y_RM = experts.forward_ragged(recv_RM.index_select(0, perm_R).to(dtype),
                                      counts).to(recv_RM.dtype)
        return torch.empty_like(y_RM).index_copy(0, perm_R, y_RM)

    def first(self, counts_Wn: np.ndarray, at: int) -> np.ndarray:
        """Where chunk bound `at` (of [0, C]) falls in each segment: the same share of every
        segment's rows, floor(at * n / C), so that chunks are equal in rows on every rank and
        every link however skewed the segments are (slot ranges would put a hot expert's rows
        in the last chunks alone)."""
        if self.capacity == 0:
            return np.zeros_like(counts_Wn)
        return (counts_Wn * at) // self.capacity

    def part(self, counts_Wn: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Rows of each segment in chunk [lo, hi)."""
        return self.first(counts_Wn, hi) - self.first(counts_Wn, lo)

    def rows(self, lo: int, hi: int, side: str) -> list[int]:
        """Rows per rank of chunk [lo, hi): sent to each rank ("send") or received from each
        ("recv")."""
        counts_Wn = self.send_Wn if side == "send" else self.recv_Wn
        return self.part(counts_Wn, lo, hi).sum(axis=1).tolist()

    def index(self, lo: int, hi: int, side: str) -> np.ndarray:
        """Positions, in the whole side's rows, of the rows of chunk [lo, hi)."""
        counts = (self.send_Wn if side == "send" else self.recv_Wn).reshape(-1)
        starts = np.cumsum(counts) - counts
        return _runs(starts + self.first(counts, lo), self.part(counts, lo, hi))

    def slice(self, x_NM: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        if (lo, hi) == (0, self.capacity):
            return x_NM
        return x_NM.index_select(0, self._on(x_NM.device, ("send", lo, hi),
                                             lambda: self.index(lo, hi, "send")))

    def cat(self, parts: list[torch.Tensor], bounds: list[tuple[int, int]]) -> torch.Tensor:
        if len(parts) == 1:
            return parts[0]
        index = self._on(parts[0].device, ("cat", *bounds), lambda: np.concatenate(
            [self.index(lo, hi, "send") for lo, hi in bounds]))
        return torch.empty_like(torch.cat(parts)).index_copy(0, index, torch.cat(parts))

    def chunk_bytes(self, shape: tuple[int, ...], itemsize: int, lo: int, hi: int) -> int:
        return int(self.part(self.send_Wn, lo, hi).sum()) * shape[-1] * itemsize

    def expert_order(self, lo: int, hi: int) -> tuple[np.ndarray, list[int]]:
        """For the received rows of chunk [lo, hi) (ordered by source rank, then expert): the
        permutation to expert-major order, and the rows of each local expert."""
        take_Wn = self.part(self.recv_Wn, lo, hi)
        starts_Wn = (np.cumsum(take_Wn.reshape(-1)) - take_Wn.reshape(-1)).reshape(take_Wn.shape)
        return _runs(starts_Wn.T.reshape(-1), take_Wn.T.reshape(-1)), \
            take_Wn.sum(axis=0).tolist()

    def _on(self, device: torch.device, key: tuple, host) -> torch.Tensor:
        """The index `host` (an array, or a function making one) on `device`, made once per
        key and sent without a sync."""
        if key not in self._index:
            values = host() if callable(host) else host
            self._index[key] = to_device(torch.from_numpy(np.ascontiguousarray(values)), device)
        return self._index[key]


def _runs(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of arange(starts[i], starts[i] + lengths[i]) for every i."""
    run = np.repeat(np.arange(lengths.size), lengths)
    first = np.cumsum(lengths) - lengths
    return (starts[run] + np.arange(int(lengths.sum())) - first[run]).astype(np.int64)
