"""HIGGS encode/decode against the slow oracle; group-size choice; bit packing.

Tolerances (float32 fast path vs float64 oracle):
- scales: equal, or one float16 ulp apart when ‖x_g‖ sits within float32 rounding of a
  float16 rounding boundary (rare: at most 1% of groups here);
- codes: identical in every group whose scales agree, except near-ties, where the two chosen
  grid points' squared distances to the oracle's y differ by at most 1e-5·(1 + ‖y_pair‖²);
- reconstruction, where codes and scales agree: |x̂_fast − x̂_oracle| <= 1e-6·‖x_g‖ per entry.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from aquakv_gguf.quant import (HiggsQuantizer, bits_per_code, choose_group_size, gaussian_grid,
                               pack_codes, unpack_codes)
from aquakv_gguf.quant import higgs as higgs_mod
from aquakv_gguf.quant.higgs import quantize_reference_slow


@pytest.fixture(scope="module", autouse=True)
def private_grid_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Grids already in memory (test_grids.py ran first) are reused; any others are built into
    # a private folder rather than the user's cache.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AQUAKV_CACHE_DIR", str(tmp_path_factory.mktemp("grid_cache")))
        yield


def _data(kind: str, rows: int, channels: int, seed: int) -> np.ndarray:
    """``[rows, channels]`` float32 test vectors of a given flavour."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, channels))
    if kind == "scaled":  # norms spread over six decades, as K/V rows of different layers
        x *= 10.0 ** rng.uniform(-3, 3, size=(rows, 1))
    elif kind == "heavy":  # Student-t, 2 degrees of freedom: heavy tails
        x = rng.standard_t(2.0, size=(rows, channels)) * 3.0
    elif kind == "outliers":  # a few huge channels, as in real key caches
        x[:, rng.choice(channels, size=3, replace=False)] *= 200.0
    elif kind == "tiny":  # group norms in float16's subnormal range
        x *= 1e-6
    return x.astype(np.float32)


CASES = [  # (grid points, C, G, data)
    (256, 192, 64, "normal"),
    (256, 192, 64, "heavy"),
    (16, 128, 128, "normal"),
    (16, 128, 128, "scaled"),
    (64, 1024, 1024, "normal"),
    (64, 1024, 1024, "outliers"),
    (256, 1024, 1024, "heavy"),
    (64, 192, 64, "scaled"),
    (16, 192, 64, "tiny"),
]


@pytest.mark.parametrize("n_points,channels,group,kind", CASES)
def test_encode_decode_match_oracle(n_points: int, channels: int, group: int, kind: str) -> None:
    grid = gaussian_grid(n_points)
    q = HiggsQuantizer(grid, group)
    rows = 8 if channels >= 1024 else 24
    x = _data(kind, rows, channels, seed=zlib.crc32(f"{n_points}/{channels}/{kind}".encode()))
    codes, scales = q.encode(torch.from_numpy(x))
    x_hat = q.decode(codes, scales)
    d = grid.shape[1]
    n_groups = channels // group
    assert codes.shape == (rows, channels // d) and codes.dtype == torch.int32
    assert scales.shape == (rows, n_groups) and scales.dtype == torch.float16
    assert x_hat.shape == (rows, channels) and x_hat.dtype == torch.float32
    torch.testing.assert_close(q.quantize(torch.from_numpy(x)), x_hat, rtol=0, atol=0)

    codes_np, scales_np, x_hat_np = codes.numpy(), scales.numpy(), x_hat.numpy()
    g64 = grid.astype(np.float64)
    pairs_per_group = group // d
    scale_mismatch = ties = compared_groups = 0
    for r in range(rows):
        ref = quantize_reference_slow(x[r], grid, group)
        for gi in range(n_groups):
            s_fast, s_ref = scales_np[r, gi], ref.scales[gi]
            if s_fast != s_ref:
                scale_mismatch += 1
                assert abs(np.spacing(s_ref)) >= abs(np.float32(s_fast) - np.float32(s_ref))
                continue
            compared_groups += 1
            sl = slice(gi * pairs_per_group, (gi + 1) * pairs_per_group)
            c_fast, c_ref = codes_np[r, sl], ref.codes[sl]
            differ = np.flatnonzero(c_fast != c_ref)
            y = ref.y[gi * group:(gi + 1) * group].reshape(-1, d)
            for j in differ:  # allowed only for near-ties
                d_fast = np.sum((y[j] - g64[c_fast[j]]) ** 2)
                d_ref = np.sum((y[j] - g64[c_ref[j]]) ** 2)
                assert d_fast - d_ref <= 1e-5 * (1.0 + np.sum(y[j] ** 2)), (r, gi, j)
            ties += differ.size
            if differ.size == 0:
                cols = slice(gi * group, (gi + 1) * group)
                tol = 1e-6 * float(np.linalg.norm(x[r, cols].astype(np.float64))) + 1e-30
                err = np.abs(x_hat_np[r, cols] - ref.x_hat[cols]).max()
                assert err <= tol, (r, gi, err, tol)
    total_groups = rows * n_groups
    assert scale_mismatch <= 0.01 * total_groups + 1
    assert ties <= 1e-3 * compared_groups * pairs_per_group + 1
    assert compared_groups >= 0.99 * total_groups - 1


def test_quantization_error_matches_grid_distortion() -> None:
    # On Gaussian data y's pairs are ≈ N(0, I_2), so the relative MSE is the grid's MSE.
    x = torch.randn(2048, 128, generator=torch.Generator().manual_seed(3))
    for n, expected in ((16, 0.1076), (64, 0.0297), (256, 0.00777)):
        q = HiggsQuantizer(gaussian_grid(n), 128)
        rel = float(((q.quantize(x) - x) ** 2).sum() / (x ** 2).sum())
        assert abs(rel - expected) / expected < 0.05, (n, rel)


def test_zero_vector_and_zero_groups() -> None:
    grid = gaussian_grid(64)
    q = HiggsQuantizer(grid, 64)
    x = torch.zeros(3, 192)
    x[1, 64:128] = torch.randn(64)  # one live group among zero groups
    codes, scales = q.encode(x)
    assert float(scales[0].abs().max()) == 0.0 and float(scales[1, 0]) == 0.0
    # y = 0 scores −‖g‖²: the smallest-norm point, lowest index on ties
    norms = (grid.astype(np.float64) ** 2).sum(axis=1)
    assert (codes[0].numpy() == int(np.argmin(norms))).all()
    x_hat = q.decode(codes, scales)
    assert float(x_hat[0].abs().max()) == 0.0
    assert float(x_hat[1, :64].abs().max()) == 0.0 and float(x_hat[1, 128:].abs().max()) == 0.0
    for r in range(3):
        ref = quantize_reference_slow(x[r].numpy(), grid, 64)
        np.testing.assert_array_equal(ref.codes, codes[r].numpy())
        np.testing.assert_array_equal(ref.scales, scales[r].numpy())


def test_rounded_scale_is_the_divisor() -> None:
    # Two channels x = (a, a) with ‖x‖ = 1.0004, which float16 rounds down to 1.0. Then
    # y = H·x / s = (2a / s, 0): 1.41478 with the stored (rounded) scale, 1.41421 with the
    # exact norm. A two-point grid with its boundary at 1.4145 tells them apart.
    grid = np.array([[0.0, 0.0], [2.829, 0.0]], dtype=np.float32)
    q = HiggsQuantizer(grid, 2)
    a = np.float32(1.0004 / math.sqrt(2.0))
    codes, scales = q.encode(torch.tensor([[a, a]]))
    assert float(scales[0, 0]) == 1.0
    assert codes.tolist() == [[1]]  # the exact norm would have given 0
    ref = quantize_reference_slow(np.array([a, a]), grid, 2)
    assert ref.codes.tolist() == [1] and float(ref.scales[0]) == 1.0
    # the decoder multiplies by the same stored scale: H·(1.0·g1) / 2
    torch.testing.assert_close(q.decode(codes, scales), torch.tensor([[1.4145, 1.4145]]))


def test_batched_shapes_empty_batch_and_numpy_input() -> None:
    q = HiggsQuantizer(gaussian_grid(16), 64)
    x = torch.randn(2, 3, 5, 128)
    codes, scales = q.encode(x)
    assert codes.shape == (2, 3, 5, 64) and scales.shape == (2, 3, 5, 2)
    flat_codes, flat_scales = q.encode(x.reshape(-1, 128))
    torch.testing.assert_close(codes.reshape(-1, 64), flat_codes)
    assert q.decode(codes, scales).shape == x.shape
    c0, s0 = q.encode(torch.zeros(0, 128))
    assert c0.shape == (0, 64) and s0.shape == (0, 2) and q.decode(c0, s0).shape == (0, 128)
    c_np, s_np = q.encode(x.numpy())
    torch.testing.assert_close(c_np, codes)
    # float16 / bfloat16 inputs are upcast to float32 before anything else
    c_h, _ = q.encode(x.half())
    assert (c_h == q.encode(x.half().float())[0]).all()


def test_chunked_argmax_equals_single_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    q = HiggsQuantizer(gaussian_grid(256), 256)
    x = torch.randn(40, 256)
    codes, _ = q.encode(x)
    monkeypatch.setattr(higgs_mod, "_SCORE_CHUNK_ELEMS", 256 * 37)  # 37 rows, ragged tail
    chunked, _ = q.encode(x)
    torch.testing.assert_close(chunked, codes, rtol=0, atol=0)


def test_bad_inputs() -> None:
    grid = gaussian_grid(16)
    with pytest.raises(ValueError, match="power of two"):
        HiggsQuantizer(grid, 48)
    with pytest.raises(ValueError, match="power of two"):
        HiggsQuantizer(grid[:12], 64)
    q = HiggsQuantizer(grid, 64)
    with pytest.raises(ValueError, match="groups of 64"):
        q.encode(torch.randn(2, 96))
    bad = torch.randn(2, 128)
    bad[0, 3] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        q.encode(bad)
    with pytest.raises(ValueError, match="not finite"):
        q.encode(torch.full((1, 64), 1e4))  # norm 8e4 > float16 max
    codes, scales = q.encode(torch.randn(2, 128))
    with pytest.raises(ValueError):
        q.decode(codes, scales[:, :1])
    with pytest.raises(ValueError):
        q.decode(codes[:1], scales)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    q = HiggsQuantizer(gaussian_grid(256), 64)
    x = torch.randn(512, 192)
    c_cpu, s_cpu = q.encode(x)
    c_gpu, s_gpu = q.encode(x.cuda())
    assert c_gpu.device.type == "cuda"
    assert (c_gpu.cpu() != c_cpu).float().mean() < 1e-3
    assert (s_gpu.cpu() != s_cpu).float().mean() < 1e-2
    torch.testing.assert_close(q.decode(c_gpu, s_gpu).cpu(), q.decode(c_cpu, s_cpu),
                               rtol=0, atol=0.05)


# ----------------------------------------------------------------------------- group size

@pytest.mark.parametrize("channels,head_dim,expected", [
    (192, 64, 64), (512, 64, 512), (1024, 64, 1024), (1024, 128, 1024), (128, 128, 128),
    (320, 64, 64), (384, 128, 128), (896, 64, 128), (576, 64, 64),
])
def test_choose_group_size(channels: int, head_dim: int, expected: int) -> None:
    assert choose_group_size(channels, head_dim) == expected


@pytest.mark.parametrize("channels,head_dim", [(96, 64), (192, 128), (640, 256), (0, 64)])
def test_choose_group_size_rejects(channels: int, head_dim: int) -> None:
    with pytest.raises(ValueError, match=str(channels)) as info:
        choose_group_size(channels, head_dim)
    assert str(head_dim) in str(info.value)


def test_bits_per_code() -> None:
    assert [bits_per_code(n) for n in (2, 16, 64, 256)] == [1, 4, 6, 8]
    for bad in (0, 1, 48, 100):
        with pytest.raises(ValueError):
            bits_per_code(bad)


# ----------------------------------------------------------------------------- packing

def _pack_slow(row: list[int], bits: int) -> bytes:
    """The layout, spelled out bit by bit."""
    out = bytearray((len(row) * bits + 7) // 8)
    for i, code in enumerate(row):
        for b in range(bits):
            k = i * bits + b
            if (code >> b) & 1:
                out[k // 8] |= 1 << (k % 8)
    return bytes(out)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 12])
@pytest.mark.parametrize("m", [1, 3, 5, 7, 33, 96])
def test_pack_round_trip(bits: int, m: int) -> None:
    rng = np.random.default_rng(bits * 1000 + m)
    codes = rng.integers(0, 1 << bits, size=(2, 3, m))
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (2, 3, math.ceil(m * bits / 8))
    back = unpack_codes(packed, bits, m)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, codes)
    assert packed[0, 1].tobytes() == _pack_slow(codes[0, 1].tolist(), bits)


def test_pack_layout_examples_and_torch_input() -> None:
    np.testing.assert_array_equal(pack_codes(np.array([1, 2, 3, 4]), 6), [129, 48, 16])
    np.testing.assert_array_equal(pack_codes(np.array([1, 2, 15]), 4), [0x21, 0x0F])
    np.testing.assert_array_equal(pack_codes(np.array([255, 0, 7]), 8), [255, 0, 7])
    q = HiggsQuantizer(gaussian_grid(64), 64)
    codes, _ = q.encode(torch.randn(4, 192))
    packed = pack_codes(codes, q.bits)
    assert packed.shape == (4, 96 * 6 // 8)
    np.testing.assert_array_equal(unpack_codes(torch.from_numpy(packed), 6, 96), codes.numpy())


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="lie in"):
        pack_codes(np.array([0, 16]), 4)
    with pytest.raises(ValueError, match="lie in"):
        pack_codes(np.array([-1]), 4)
    with pytest.raises(ValueError):
        pack_codes(np.array([0.5]), 4)
    with pytest.raises(ValueError):
        pack_codes(np.array([1]), 0)
    with pytest.raises(ValueError, match="need uint8"):
        unpack_codes(np.zeros(3, dtype=np.uint8), 6, 5)
