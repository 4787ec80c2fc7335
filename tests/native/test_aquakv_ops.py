"""The native AQUA-KV ggml ops (CPU kernels) against the torch HIGGS quantizer, the oracle.

Codes must match on >= 99.9% of random vectors (ties and last-bit differences of the Hadamard
sum order aside), scales exactly in f16, and decoding must reproduce the torch decoder's output
from the same codes to float tolerance, for every grid and group size the converter writes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aquakv_gguf.quant import HiggsQuantizer, bits_per_code, fwht, gaussian_grid, pack_codes
from aquakv_gguf.runtime.ops import decode_rows, encode_rows, row_bytes, split_rows

GRIDS = {n: gaussian_grid(n) for n in (16, 64, 256)}


def sample(n_rows: int, n_channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # per-row scales over several decades, plus structure across channels (not just i.i.d. noise)
    base = rng.standard_normal((n_rows, n_channels)).astype(np.float32)
    mix = rng.standard_normal((n_channels, n_channels)).astype(np.float32) / np.sqrt(n_channels)
    scale = np.exp(rng.uniform(-3, 3, size=(n_rows, 1))).astype(np.float32)
    return ((base + 0.5 * base @ mix) * scale).astype(np.float32)


@pytest.mark.parametrize("n_points", [16, 64, 256])
@pytest.mark.parametrize("n_channels,group_size", [(192, 64), (128, 128), (256, 256), (512, 128), (1024, 1024)])
def test_native_codes_match_the_torch_quantizer(n_points, n_channels, group_size):
    grid = GRIDS[n_points]
    bits = bits_per_code(n_points)
    x = sample(1024, n_channels, seed=n_points + n_channels)
    rows = encode_rows(x, grid, group_size)
    assert rows.shape == (1024, row_bytes(n_channels, group_size, 2, n_points))

    q = HiggsQuantizer(grid, group_size)
    codes_ref, scales_ref = q.encode(torch.from_numpy(x))
    codes_ref, scales_ref = codes_ref.numpy(), scales_ref.numpy()
    codes, scales = split_rows(rows, n_channels, group_size, bits)

    # scales: the f16 rounding of the group norm; a different summation order may land one f16 step away
    same_scale = scales == scales_ref
    assert same_scale.mean() >= 0.999
    ulps = np.abs(scales.view(np.int16).astype(np.int32) - scales_ref.view(np.int16).astype(np.int32))
    assert ulps.max() <= 1

    # codes: >= 99.9% of the coded 2-D vectors agree; every other one is a tie of the grid scores
    mismatch = codes != codes_ref
    assert 1 - mismatch.mean() >= 0.999, f"{mismatch.mean():.3%} of the coded vectors differ"
    g = grid.astype(np.float64)
    xg = torch.from_numpy(x).reshape(len(x), -1, group_size)
    y = (fwht(xg) / torch.from_numpy(scales_ref).float()[..., None]).reshape(len(x), -1, 2).double().numpy()
    group_ok = np.repeat(same_scale, group_size // 2, axis=1)
    for r, p in np.argwhere(mismatch & group_ok):
        score = 2 * y[r, p] @ g.T - (g * g).sum(1)
        assert abs(score[codes[r, p]] - score[codes_ref[r, p]]) < 1e-3, "a code differs where the scores do not tie"

    # where a whole row agrees, the packed bytes are exactly the Python packing
    same = ~mismatch.any(axis=1) & same_scale.all(axis=1)
    assert same.mean() >= 0.99
    expected = np.concatenate([pack_codes(codes_ref[same], bits), scales_ref[same].view(np.uint8)], axis=1)
    np.testing.assert_array_equal(rows[same], expected)


@pytest.mark.parametrize("n_points", [16, 64, 256])
@pytest.mark.parametrize("n_channels,group_size", [(192, 64), (256, 256), (1024, 1024)])
def test_native_decode_matches_the_torch_decoder(n_points, n_channels, group_size):
    grid = GRIDS[n_points]
    bits = bits_per_code(n_points)
    x = sample(512, n_channels, seed=7 * n_points + n_channels)
    rows = encode_rows(x, grid, group_size)
    codes, scales = split_rows(rows, n_channels, group_size, bits)
    ref = HiggsQuantizer(grid, group_size).decode(torch.from_numpy(codes), torch.from_numpy(scales)).numpy()
    out = decode_rows(rows, grid, n_channels, group_size)
    rel = np.abs(out - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert rel.max() <= 1e-4, f"max relative decode error {rel.max():.2e}"
    # and the reconstruction is a quantization of x, not noise: error shrinks with more points
    err = np.linalg.norm(out - x, axis=1) / np.linalg.norm(x, axis=1)
    assert err.mean() < {16: 0.40, 64: 0.20, 256: 0.10}[n_points]


def test_zero_rows_encode_to_zero_scale_and_decode_to_zero():
    x = np.zeros((3, 192), dtype=np.float32)
    rows = encode_rows(x, GRIDS[16], 64)
    _, scales = split_rows(rows, 192, 64, 4)
    assert np.all(scales == 0)
    np.testing.assert_array_equal(decode_rows(rows, GRIDS[16], 192, 64), x)


def test_threads_do_not_change_the_codes():
    x = sample(333, 192, seed=3)
    np.testing.assert_array_equal(encode_rows(x, GRIDS[64], 64, n_threads=1), encode_rows(x, GRIDS[64], 64, n_threads=2))


@pytest.mark.parametrize("args", [(192, 96, 2, 16), (192, 64, 2, 15), (100, 64, 2, 16), (192, 256, 2, 16)])
def test_invalid_layouts_are_refused(args):
    with pytest.raises(ValueError, match="no AQUA-KV row layout"):
        row_bytes(*args)


def test_decode_refuses_rows_of_the_wrong_size():
    with pytest.raises(ValueError, match="rows must be"):
        decode_rows(np.zeros((2, 10), dtype=np.uint8), GRIDS[16], 192, 64)

