"""A small MoE language model: pre-norm transformer blocks whose FFN is an MoELayer.

Legend: B sequences, S tokens per sequence, M model dim, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...layer import MoELayer


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden_dim: int, moe_options: dict) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.moe = MoELayer(dim, hidden_dim=hidden_dim, **moe_options)

    def forward(self, x_BSM: torch.Tensor, mask_SS: torch.Tensor) -> torch.Tensor:
        h_BSM = self.norm1(x_BSM)
        x_BSM = x_BSM + self.attn(h_BSM, h_BSM, h_BSM, attn_mask=mask_SS, need_weights=False)[0]
        return x_BSM + self.moe(self.norm2(x_BSM))


class MoELM(nn.Module):
    """`forward(tokens_BS) -> (logits_BSV, aux)`: aux is the sum of the layers' aux losses.
    `moe_options` go to every MoELayer (num_experts, top_k, group, ...)."""

    def __init__(self, vocab: int, dim: int = 64, layers: int = 2, heads: int = 4,
                 seq: int = 64, hidden_dim: int | None = None, **moe_options) -> None:
        super().__init__()
        moe_options.setdefault("num_experts", 4)
        moe_options.setdefault("top_k", 2)
        self.embed = nn.Embedding(vocab, dim)
        self.pos_SM = nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden_dim or 2 * dim, moe_options)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask_SS", torch.triu(torch.full((seq, seq), float("-inf")), 1),
                             persistent=False)

    def forward(self, tokens_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq = tokens_BS.shape[1]
        x_BSM = self.embed(tokens_BS) + self.pos_SM[:seq]
        aux = x_BSM.new_zeros(())
        for block in self.blocks:
            x_BSM = block(x_BSM, self.mask_SS[:seq, :seq])
            aux = aux + block.moe.aux_loss
        return self.head(self.norm(x_BSM)), aux


def lm_loss(model: nn.Module, inputs_BS: torch.Tensor, targets_BS: torch.Tensor,
            aux_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss to minimise, cross-entropy, aux) of one batch."""
    logits_BSV, aux = model(inputs_BS)
    ce = F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]), targets_BS.reshape(-1))
    return ce + aux_weight * aux, ce, aux
