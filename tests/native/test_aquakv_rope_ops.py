"""The read path's RoPE + f16 op (``ggml_aquakv_rope_f16``) against upstream's ``ggml_rope_ext`` then
``ggml_cast``, and its rotation-free form (the value cast) against numpy's float16 rounding.

The fused op rotates each pair with the same products and sums as ggml's RoPE, the angles coming
from ggml's RoPE of a unit pattern, so the f16 results agree except where the compiler contracts a
product and a sum into one FMA in one of the two kernels and the f32 results round across an f16
boundary: the bound below is on that share and on the size of such a difference (one f16 ulp).
"""

from __future__ import annotations

import numpy as np
import pytest

from aquakv_gguf.runtime.ops import cast_f16, rope_f16


def keys(n_tokens: int, n_head: int, head_dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_tokens, n_head, head_dim)) * np.exp(rng.uniform(-2, 2, (n_tokens, 1, 1))))
    pos = rng.integers(0, 32768, n_tokens).astype(np.int32)
    return x.astype(np.float32), pos


def ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in f16 ulps (same-sign values; a sign flip at zero counts as its bit distance)."""
    ia = a.view(np.int16).astype(np.int32)
    ib = b.view(np.int16).astype(np.int32)
    ia = np.where(ia < 0, -32768 - ia, ia)
    ib = np.where(ib < 0, -32768 - ib, ib)
    return np.abs(ia - ib)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("head_dim,n_head,freq_base", [(64, 3, 10000.0), (128, 8, 500000.0), (64, 2, 1000000.0)])
def test_fused_rope_matches_upstream_rope_and_cast(neox, head_dim, n_head, freq_base):
    x, pos = keys(777, n_head, head_dim, seed=head_dim + n_head + int(neox))
    fused = rope_f16(x, pos, neox=neox, freq_base=freq_base)
    upstream = rope_f16(x, pos, neox=neox, freq_base=freq_base, fused=False)
    d = ulps(fused, upstream)
    print(f"neox={neox} hd={head_dim}: {np.mean(d == 0):.6f} identical, max {d.max()} ulp")
    assert np.isfinite(fused.astype(np.float32)).all()
    assert np.mean(d == 0) >= 0.999 and d.max() <= 1


@pytest.mark.parametrize("neox", [False, True])
def test_rope_pairs_channels_like_the_model(neox):
    """A rotation moves energy only inside the pairs of its pairing: NORM (2k, 2k+1), NEOX (k, k + d/2)."""
    head_dim = 8
    x = np.zeros((1, 1, head_dim), dtype=np.float32)
    x[0, 0, 1] = 1.0  # channel 1 pairs with 0 (NORM) or with 5 (NEOX)
    out = rope_f16(x, np.array([7], dtype=np.int32), neox=neox).astype(np.float32)[0, 0]
    partner = 5 if neox else 0
    assert np.count_nonzero(out) == 2 and out[1] != 0 and out[partner] != 0
    assert abs(out[1] ** 2 + out[partner] ** 2 - 1.0) < 2e-3  # a rotation (magnitude 1 without YaRN)


def test_value_cast_rounds_like_numpy():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((1000, 192)) * np.exp(rng.uniform(-12, 10, (1000, 1)))).astype(np.float32)
    x[0, :4] = [0.0, -0.0, 65504.0, 1e-8]
    with np.errstate(over="ignore"):  # values beyond 65504 become inf in both
        want = x.astype(np.float16)
    np.testing.assert_array_equal(cast_f16(x).view(np.uint16), want.view(np.uint16))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="even head_dim"):
        rope_f16(np.zeros((4, 2, 7), np.float32), np.zeros(4, np.int32), neox=False)
    with pytest.raises(ValueError, match="one position per token"):
        rope_f16(np.zeros((4, 2, 8), np.float32), np.zeros(3, np.int32), neox=True)
    with pytest.raises(ValueError, match="n_rows >= 1"):
        cast_f16(np.zeros((0, 8), np.float32))
