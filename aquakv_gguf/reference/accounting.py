"""KV-cache storage accounting (DESIGN §3 "Bits per value").

Bits per value = stored bytes of K and V × 8 / (L · C · 2 · n_tokens), counting per token and
layer: the codes (``C/d · log2(n_points)`` bits per K or V vector), one f16 scale per group of
G channels, and 16 bits per channel for tokens kept in f16 (the P sinks and the recent window,
which holds ``n − quantized_end(n)`` tokens at context n).  Layer 0 uses the 4-bit grid in
AQUA-KV mode.  Predictor weights are reported separately (``AquaKVParams.predictor_bytes``).
"""

from __future__ import annotations

import math

from .semantics import quantized_end


def quantized_vector_bits(n_channels: int, group_size: int, n_points: int, grid_dim: int = 2) -> int:
    """Bits of one quantized K (or V) vector: codes + f16 group scales."""
    codes = (n_channels // grid_dim) * int(math.log2(n_points))
    return codes + 16 * (n_channels // group_size)


def kv_bits(n_tokens: int, *, n_layers: int, n_channels: int, group_size: int, n_points: int,
            n_points0: int | None, prefix_tokens: int, recent_tokens: int, grid_dim: int = 2) -> int:
    """Total stored bits of K and V for ``n_tokens`` tokens (one sequence).

    ``n_points0`` is layer 0's grid size (None: same as the others).  ``n_points = 0`` means an
    all-f16 cache.
    """
    f16_vector = 16 * n_channels
    if n_points == 0:
        return 2 * n_layers * n_tokens * f16_vector
    q_end = min(quantized_end(n_tokens, prefix_tokens, recent_tokens), n_tokens)
    n_quant = max(0, q_end - prefix_tokens)
    n_f16 = n_tokens - n_quant
    total = 0
    for layer in range(n_layers):
        pts = n_points0 if (layer == 0 and n_points0) else n_points
        total += 2 * (n_quant * quantized_vector_bits(n_channels, group_size, pts, grid_dim) + n_f16 * f16_vector)
    return total


def bits_per_value(n_tokens: int, **kwargs: int | None) -> float:
    """``kv_bits(n_tokens, ...) / (L · C · 2 · n_tokens)``; same keyword arguments as kv_bits."""
    total = kv_bits(n_tokens, **kwargs)  # type: ignore[arg-type]
    return total / (kwargs["n_layers"] * kwargs["n_channels"] * 2 * n_tokens)  # type: ignore[operator]
