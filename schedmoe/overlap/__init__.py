"""Overlap beyond one layer call: micro-batches interleaved so that one's exchanges are in
flight while another computes (microbatches.py, turns.py), and the data-parallel gradient
all-reduce sent in chunks while no exchange needs the link (grad_sync.py, link.py).

Built on the layer. May import: `errors`, `exchange/` (its events), `streams/`, `parallel/`.
"""

from .grad_sync import GradSync
from .microbatches import interleaved_step

__all__ = ["interleaved_step", "GradSync"]
