"""What the last call of a layer did on this rank (`layer.last_stats`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .recorder import StepRecorder


@dataclass
class LayerStats:
    """What the last forward did on this rank."""

    tokens: int  # T
    capacity: int  # C of the exchanged buffer (max over ranks)
    limit: int  # this rank's own capacity limit
    counts: list[int]  # (token, choice) pairs routed to each global expert, before dropping
    dropped_per_expert: list[int]
    processed: int  # pairs that reached an expert
    dropped: int  # pairs dropped; processed + dropped == tokens * top_k
    kept_TK: torch.Tensor = field(repr=False)  # bool [T, K]: which (token, choice) pairs were kept
    schedule: dict = field(repr=False)  # what the scheduler decided for this call (adaptive)
    timer: StepRecorder = field(repr=False)

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
