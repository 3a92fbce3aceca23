"""A tiny character-level MoE language model on a corpus that ships with Python (stdlib source).

Used by the compression experiment's convergence check; deterministic for a given seed.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

import schedmoe

CORPUS_MODULES = ["argparse", "collections", "dataclasses", "json.decoder", "textwrap", "string"]


def corpus() -> str:
    import importlib

    return "\n".join(inspect.getsource(importlib.import_module(m)) for m in CORPUS_MODULES)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, moe_options: dict) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.moe = schedmoe.MoELayer(dim, hidden_dim=2 * dim, **moe_options)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.moe(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int = 64, layers: int = 2, heads: int = 4,
                 seq: int = 64, **moe_options) -> None:
        super().__init__()
        moe_options.setdefault("num_experts", 4)
        moe_options.setdefault("top_k", 2)
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, moe_options) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", torch.triu(torch.full((seq, seq), float("-inf")), 1))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq = tokens.shape[1]
        x = self.embed(tokens) + self.pos[:seq]
        aux = x.new_zeros(())
        for block in self.blocks:
            x = block(x, self.mask[:seq, :seq])
            aux = aux + block.moe.aux_loss
        return self.head(self.norm(x)), aux


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
