"""An independent dense MoE: every token, every choice, one expert at a time, in plain loops.

It shares no code with schedmoe beyond torch: routing, capacity, dropping and the expert math
are written out again here, so that a bug in the library cannot hide in the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACT = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def route(x, wg, top_k, normalize=True):
    """(probs, chosen experts, weights) per token, as in GShard/Tutel top-k gating."""
    probs = torch.softmax(x.float() @ wg.float().t(), dim=-1)
    top_p, top_e = torch.topk(probs, top_k, dim=-1)
    if normalize and top_k > 1:
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
    return probs, top_e, top_p


def capacity(cf, top_k, num_tokens, num_experts, top_e):
    counts = [0] * num_experts
    for e in top_e.flatten().tolist():
        counts[e] += 1
    needed = max(counts) if num_tokens else 0
    fixed = math.ceil(abs(cf) * top_k * num_tokens / num_experts)
    return fixed if cf > 0 else (needed if cf == 0 else min(needed, fixed))


def keep_mask(top_e, top_p, cap, num_experts, policy):
    """Which (token, choice) pairs fit: choices in order k, tokens by position or probability."""
    num_tokens, top_k = top_e.shape
    tokens = list(range(num_tokens))
    if policy == "probability":
        best = top_p[:, 0].tolist()
        tokens.sort(key=lambda t: -best[t])  # Python's sort is stable
    used = [0] * num_experts
    keep = [[False] * top_k for _ in range(num_tokens)]
    for k in range(top_k):
        for t in tokens:
            e = int(top_e[t, k])
            if used[e] < cap:
                used[e] += 1
                keep[t][k] = True
    return keep


def expert_ffn(x_t, e, w, activation):
    if "w3" in w:  # swiglu
        h = ACT[activation](x_t @ w["w1"][e]) * (x_t @ w["w3"][e])
        return h @ w["w2"][e]
    h = ACT[activation](x_t @ w["w1"][e] + w["b1"][e])
    return h @ w["w2"][e] + w["b2"][e]


def dense_moe(x, wg, w, *, top_k, cf, num_experts, activation="gelu", policy="position"):
    """Output, balance loss and keep mask of one rank's tokens `x` [T, M]."""
    probs, top_e, top_p = route(x, wg, top_k)
    cap = capacity(cf, top_k, x.shape[0], num_experts, top_e)
    keep = keep_mask(top_e, top_p, cap, num_experts, policy)
    rows = []
    for t in range(x.shape[0]):
        y_t = torch.zeros_like(x[t])
        for k in range(top_k):
            if keep[t][k]:
                e = int(top_e[t, k])
                y_t = y_t + top_p[t, k].to(x.dtype) * expert_ffn(x[t], e, w, activation)
        rows.append(y_t)
    y = torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])
    if x.shape[0]:
        frac = torch.zeros(num_experts)
        for e in top_e[:, 0].tolist():
            frac[e] += 1.0 / x.shape[0]
        aux = num_experts * (probs.mean(0) * frac).sum()
    else:
        aux = probs.sum()
    return y, aux, keep
