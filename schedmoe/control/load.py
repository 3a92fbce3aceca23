"""Expert load over a window: how many (token, expert) pairs each expert gets, and how evenly
the ranks holding them share the work (SmartMoE's and EPLB's input).

Legend: E experts (global), W ranks of the EP group.

Each layer keeps `ExpertLoad`: an exponential moving average, call by call, of the pairs its
rank routed to each global expert and of those dropped, as device tensors updated without a
host sync (on the `stats` lane, which every call shares, so that micro-batches on streams of
their own update it in turn; readers join that lane). The ranks' averages summed (over the EP
group and its data-parallel replicas: every rank routes only its own tokens) give each
expert's load; `LoadStats` reads it against the layer's placement (static: rank w holds
experts [w E / W, (w + 1) E / W); a replica gets its expert's pairs over its replicas): tokens
per rank and balancedness, mean / max tokens per rank (1.0: perfectly even).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan.placement import Placement, static_placement
from ..streams.lanes import INLINE, Lanes


class ExpertLoad:
    """The moving average of one layer's routed and dropped pairs per global expert on this
    rank; `decay` weighs the past (a window of about 1 / (1 - decay) calls)."""

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the load's decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.average_2E: torch.Tensor | None = None  # [routed, dropped] per expert
        self.calls = 0

    def observe(self, counts_E: torch.Tensor, dropped_E: torch.Tensor,
                lanes: Lanes = INLINE) -> None:
        """Add one call's counts (device ops only), on the `stats` lane: micro-batches on
        streams of their own update the average one after the other (streams/lanes.py)."""
        with lanes.on("stats", counts_E, dropped_E, self.average_2E):
            now_2E = torch.stack([counts_E, dropped_E]).float()
            if self.average_2E is None or self.average_2E.shape != now_2E.shape:
                self.average_2E = now_2E  # the first call is the window's start
            else:
                self.average_2E.mul_(self.decay).add_(now_2E, alpha=1.0 - self.decay)
        self.calls += 1

    def read(self, lanes: Lanes = INLINE) -> torch.Tensor | None:
        """The average `[routed, dropped]` per expert, for the current lane."""
        if self.average_2E is not None:
            lanes.join("stats", self.average_2E)
        return self.average_2E

    def reset(self) -> None:
        self.average_2E, self.calls = None, 0


@dataclass
class LoadStats:
    """One layer's load, summed over the ranks that route tokens to it."""

    tokens: list[float]  # pairs per call routed to each global expert (moving average)
    dropped: list[float]  # of those, dropped at the expert's capacity
    ranks: int  # W, the EP group's size
    placement: Placement | None = None  # the layer's (plan/placement.py); None: static

    @property
    def per_rank(self) -> list[float]:
        """Pairs per call the experts of each EP rank receive (a replica: its expert's pairs
        over its replicas)."""
        placement = self.placement or static_placement(len(self.tokens), self.ranks)
        return placement.rank_loads(self.tokens).tolist()

    @property
    def balancedness(self) -> float:
        """mean / max pairs per rank: 1.0 when every rank gets the same work."""
        loads = self.per_rank
        return sum(loads) / len(loads) / max(loads) if max(loads) > 0 else 1.0

    @property
    def dropped_fraction(self) -> float:
        total = sum(self.tokens)
        return sum(self.dropped) / total if total > 0 else 0.0

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "dropped": self.dropped, "per_rank": self.per_rank,
                "balancedness": self.balancedness, "dropped_fraction": self.dropped_fraction}


def read_loads(summed: list[float], layers: list) -> list[LoadStats]:
    """Each layer's `LoadStats` from the concatenation of the layers' `[routed, dropped]`
    averages (`ExpertLoad.average_2E`, flattened, in order) summed over the ranks."""
    found, at = [], 0
    for layer in layers:
        n = layer.load.average_2E.numel()
        found.append(LoadStats(summed[at:at + n // 2], summed[at + n // 2:at + n],
                               layer.group.size, layer.placement))
        at += n
    return found
