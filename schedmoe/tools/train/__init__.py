"""`schedmoe train`: a small MoE language model (`model.py`) on a corpus that ships with Python
(`data.py`), trained with expert parallelism end to end (`run.py`).

A tool. May import anything in the package.
"""

from .run import TrainConfig, latest_checkpoint, train

__all__ = ["TrainConfig", "train", "latest_checkpoint"]
