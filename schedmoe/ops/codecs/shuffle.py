"""The byte shuffle of the zstd codec (numba kernels): byte j of every value into plane j, which
exposes the redundancy of exponents and sparse activations to zstd.

Legend: n values of `itemsize` bytes.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def byte_shuffle(src: np.ndarray, itemsize: int) -> np.ndarray:
    """uint8 [n * itemsize] values -> uint8 planes: out[j * n + i] = src[i * itemsize + j]."""
    n = src.size // itemsize
    out = np.empty_like(src)
    for i in range(n):
        for j in range(itemsize):
            out[j * n + i] = src[i * itemsize + j]
    return out


@numba.njit(cache=True, nogil=True)
def byte_unshuffle(src: np.ndarray, itemsize: int) -> np.ndarray:
    """Inverse of byte_shuffle."""
    n = src.size // itemsize
    out = np.empty_like(src)
    for i in range(n):
        for j in range(itemsize):
            out[i * itemsize + j] = src[j * n + i]
    return out
