"""Fast Walsh–Hadamard transform in Sylvester (natural) ordering, for torch and numpy.

Convention shared with the native code: ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``,
i.e. ``H[i, j] = (-1)^popcount(i & j)``. H is symmetric with ±1 entries and ``H @ H = n·I``,
so ``fwht(x) == x @ H == (H @ x.T).T``.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)


def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, 8, ...; False for 0, negatives and everything else."""
    return n >= 1 and (n & (n - 1)) == 0


def _check_length(n: int) -> None:
    if not is_power_of_two(n):
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two length, got {n}")


def hadamard_matrix(n: int) -> np.ndarray:
    """The ±1 Sylvester Hadamard matrix ``H: [n, n]`` (float64), ``H[i, j] = (-1)^popcount(i & j)``.

    Built explicitly, O(n²) memory: for tests and reference code, not for the hot path.
    """
    _check_length(n)
    idx = np.arange(n, dtype=np.int64)
    both = idx[:, None] & idx[None, :]
    parity = np.zeros_like(both)
    # popcount parity without a Python loop over entries: fold the bits of (i & j).
    for shift in range(max(n.bit_length() - 1, 0)):
        parity ^= (both >> shift) & 1
    return np.where(parity == 1, -1.0, 1.0)


def fwht(x: ArrayT, *, normalize: bool = False) -> ArrayT:
    """Walsh–Hadamard transform of ``x: [..., n]`` along the last dimension (n a power of two).

    Returns ``x @ H_n`` (``/ sqrt(n)`` when ``normalize``) with the same batch shape. Torch
    tensors stay on their device and keep their dtype; numpy arrays keep theirs too (integer
    inputs become floating only when ``normalize`` is set). Each of the log2(n) butterfly
    stages costs one pass over the data, so the transform is O(n log n) per row.
    """
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise TypeError(f"fwht expects a torch.Tensor or np.ndarray, got {type(x).__name__}")
    n = int(x.shape[-1])
    _check_length(n)
    batch = tuple(x.shape[:-1])
    if isinstance(x, torch.Tensor):
        y = x.reshape(-1, n)
        h = 1
        while h < n:
            # Pairs (j, j + h) inside each block of 2h: natural-order Sylvester butterfly.
            blocks = y.reshape(-1, n // (2 * h), 2, h)
            a, b = blocks[:, :, 0, :], blocks[:, :, 1, :]
            y = torch.stack((a + b, a - b), dim=2).reshape(-1, n)
            h *= 2
        if normalize:
            y = y / math.sqrt(n)
        elif n == 1:
            y = y.clone()  # no stage ran: never hand back a view of the input
        return y.reshape(*batch, n)
    y = np.ascontiguousarray(x).reshape(-1, n)
    h = 1
    while h < n:
        blocks = y.reshape(-1, n // (2 * h), 2, h)
        a, b = blocks[:, :, 0, :], blocks[:, :, 1, :]
        y = np.stack((a + b, a - b), axis=2).reshape(-1, n)
        h *= 2
    if normalize:
        # A scalar of y's own float type keeps float32/float16 inputs in their dtype.
        root = np.sqrt(n).astype(y.dtype if np.issubdtype(y.dtype, np.floating) else np.float64)
        y = y / root
    elif n == 1:
        y = y.copy()
    return y.reshape(*batch, n)
