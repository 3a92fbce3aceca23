"""What the last call of a layer did on this rank (`layer.last_stats`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .recorder import StepRecorder


@dataclass
class LayerStats:
    """What the last forward did on this rank. The counts stay device tensors until read (no
    host sync on the hot path)."""

    tokens: int  # T
    capacity: int  # C of the exchanged buffer (max over ranks)
    limit: int  # this rank's own capacity limit
    counts_E: torch.Tensor = field(repr=False)  # pairs routed to each global expert
    dropped_E: torch.Tensor = field(repr=False)  # pairs dropped at each expert
    kept_TK: torch.Tensor = field(repr=False)  # bool [T, K]: which (token, choice) pairs were kept
    schedule: dict = field(repr=False)  # what the scheduler decided for this call (adaptive)
    timer: StepRecorder = field(repr=False)

    @property
    def counts(self) -> list[int]:
        """(token, choice) pairs routed to each global expert, before dropping."""
        return self.counts_E.tolist()

    @property
    def dropped_per_expert(self) -> list[int]:
        return self.dropped_E.tolist()

    @property
    def dropped(self) -> int:
        """Pairs dropped; processed + dropped == tokens * top_k."""
        return int(self.dropped_E.sum())

    @property
    def processed(self) -> int:
        """Pairs that reached an expert."""
        return int(self.kept_TK.sum())

    @property
    def op_ms(self) -> dict[str, float]:
        """Milliseconds per op; backward ops (`*.bwd`) appear once backward has run."""
        return self.timer.milliseconds()

    @property
    def events(self) -> list:
        """(task, chunk, stream, start, end) of every op, if the layer was built with trace=True."""
        return list(self.timer.events or [])

    @property
    def wire_bytes(self) -> dict[str, tuple[int, int]]:
        """(payload bytes, bytes on the wire) sent by this rank per exchange, backward included."""
        return {name: (raw, wire) for name, (raw, wire) in self.timer.bytes.items()}
