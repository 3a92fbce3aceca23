"""Layout transforms between A2A phases: reorder variable-size row segments of a tensor."""

from __future__ import annotations

import torch


def regroup(x: torch.Tensor, sizes_AB: list[list[int]]) -> torch.Tensor:
    """`x` holds segments in [a][b] order (segment (a, b) has sizes_AB[a][b] rows); return
    them in [b][a] order."""
    num_a = len(sizes_AB)
    num_b = len(sizes_AB[0]) if num_a else 0
    if num_a <= 1 or num_b <= 1:
        return x
    flat = [s for row in sizes_AB for s in row]
    if all(s == flat[0] for s in flat):  # even: one strided copy
        rest = x.shape[1:]
        return x.reshape(num_a, num_b, flat[0], *rest).transpose(0, 1).reshape(x.shape)
    pieces = torch.split(x, flat)
    return torch.cat([pieces[a * num_b + b] for b in range(num_b) for a in range(num_a)])


def permute(x: torch.Tensor, sizes: list[int], order: list[int] | tuple[int, ...]
            ) -> torch.Tensor:
    """`x` holds segments of `sizes` rows; return segment order[0], then order[1], ..."""
    pieces = torch.split(x, list(sizes))
    return torch.cat([pieces[i] for i in order]) if pieces else x


def offsets(sizes: list[int]) -> list[int]:
    """Start row of each segment, plus the total at the end."""
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out
