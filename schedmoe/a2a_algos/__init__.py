"""All-to-all algorithms, each registered by name in the `a2a` registry, all with exactly
`all_to_all_single` semantics: `nccl` (flat.py), `2dh` (hierarchical.py), `pipe` (pipe.py),
`staged` (staged.py: through pinned host memory, the way exchanges without GPUDirect move).

Data plane. May import: `errors`, `registry`, `comm/`."""

from .base import A2AAlgorithm, A2AHandle, all_to_all
from .flat import FlatA2A
from .hierarchical import Hierarchical2D
from .pipe import PipeA2A
from .staged import StagedA2A

__all__ = ["A2AAlgorithm", "A2AHandle", "all_to_all", "FlatA2A", "Hierarchical2D", "PipeA2A",
           "StagedA2A"]
