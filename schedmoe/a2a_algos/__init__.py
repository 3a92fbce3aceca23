"""All-to-all algorithms; each registers itself by name in the `a2a` registry."""

from .base import A2AAlgorithm, A2AHandle, all_to_all
from .flat import FlatA2A
from .hierarchical import Hierarchical2D
from .pipe import PipeA2A

__all__ = ["A2AAlgorithm", "A2AHandle", "all_to_all", "FlatA2A", "Hierarchical2D", "PipeA2A"]
