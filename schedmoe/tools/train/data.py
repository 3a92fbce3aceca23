"""The training corpus and its batches: Python's own standard-library source (it ships with
every Python), read as characters; a global batch is a function of the step alone, so a run
on any number of ranks, resumed or not, sees the same tokens.

Legend: B sequences in the global batch, S tokens per sequence.
"""

from __future__ import annotations

import importlib
import inspect

import torch

from ...errors import ConfigError

CORPUS_MODULES = ["argparse", "collections", "dataclasses", "json.decoder", "textwrap", "string"]


def corpus() -> str:
    return "\n".join(inspect.getsource(importlib.import_module(m)) for m in CORPUS_MODULES)


class CharCorpus:
    """The corpus as token ids, and the global batch of each step."""

    def __init__(self, text: str | None = None) -> None:
        text = corpus() if text is None else text
        self.vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(self.vocab)}
        self.ids = torch.tensor([index[c] for c in text], dtype=torch.long)

    def batch(self, step: int, batch: int, seq: int, seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_BS, targets_BS) of `step`'s global batch."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.ids) - seq - 1, (batch,), generator=g)
        rows = torch.stack([self.ids[s:s + seq + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]


def shard(batch_BS: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of a global batch (equal shares, so the mean of the ranks' mean losses
    is the global batch's)."""
    if batch_BS.shape[0] % world:
        raise ConfigError(f"the global batch ({batch_BS.shape[0]} sequences) must be divisible "
                          f"by the number of ranks ({world})")
    per = batch_BS.shape[0] // world
    return batch_BS[rank * per:(rank + 1) * per]
