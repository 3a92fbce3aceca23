"""A tiny character-level MoE language model (`schedmoe.tools.train.model.MoELM`) on a corpus that
ships with Python (stdlib source), single process.

Used by the compression experiment's convergence check; deterministic for a given seed.
"""

from __future__ import annotations

import torch
from torch import nn

from schedmoe.tools.train.data import corpus
from schedmoe.tools.train.model import MoELM as TinyLM


def train(compressor, steps: int = 300, seed: int = 0, batch: int = 16, seq: int = 64,
          lr: float = 3e-3, on_step=None) -> list[float]:
    """Train from a fixed init on a fixed batch order; returns the loss of every step."""
    text = corpus()
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    torch.manual_seed(seed)
    model = TinyLM(len(vocab), seq=seq, compressor=compressor, capacity_factor=1.25)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + seq] for s in starts])
        y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
        logits, aux = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), y.reshape(-1))
        opt.zero_grad()
        (loss + 0.01 * aux).backward()
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, model)
    return losses
