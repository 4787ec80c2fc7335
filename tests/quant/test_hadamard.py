"""fwht against the explicit Sylvester matrix, for numpy and torch, batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aquakv_gguf.quant import fwht, hadamard_matrix

SIZES = [2 ** k for k in range(11)]  # 1 .. 1024


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_matrix_is_sylvester(n: int) -> None:
    h = hadamard_matrix(n)
    assert h.shape == (n, n)
    rng = np.random.default_rng(n)
    i = rng.integers(n, size=500)
    j = rng.integers(n, size=500)
    expected = np.array([(-1.0) ** bin(a & b).count("1") for a, b in zip(i, j)])
    np.testing.assert_array_equal(h[i, j], expected)
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_array_equal(h @ h, n * np.eye(n))
    if n >= 2:  # the recursive definition H_2n = [[H, H], [H, -H]]
        half = hadamard_matrix(n // 2)
        np.testing.assert_array_equal(h, np.block([[half, half], [half, -half]]))


@pytest.mark.parametrize("n", SIZES)
def test_fwht_numpy_matches_matrix(n: int) -> None:
    rng = np.random.default_rng(100 + n)
    x = rng.standard_normal((3, 5, n))
    h = hadamard_matrix(n)
    y = fwht(x)
    assert isinstance(y, np.ndarray) and y.shape == x.shape and y.dtype == np.float64
    np.testing.assert_allclose(y, x @ h, rtol=1e-12, atol=1e-12 * np.sqrt(n))
    np.testing.assert_allclose(fwht(x, normalize=True), x @ h / np.sqrt(n), rtol=1e-12,
                               atol=1e-12)
    x32 = x.astype(np.float32)
    assert fwht(x32).dtype == np.float32
    assert fwht(x32, normalize=True).dtype == np.float32
    np.testing.assert_allclose(fwht(x32), x32.astype(np.float64) @ h, rtol=1e-5,
                               atol=1e-5 * np.sqrt(n))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fwht_torch_matches_matrix(n: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, 4, n, generator=gen, dtype=dtype)
    h = torch.from_numpy(hadamard_matrix(n)).to(dtype)
    y = fwht(x)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, x @ h, rtol=tol, atol=tol * n ** 0.5)
    torch.testing.assert_close(fwht(x, normalize=True), x @ h / n ** 0.5, rtol=tol, atol=tol)


@pytest.mark.parametrize("n", [1, 2, 64, 1024])
def test_fwht_is_an_involution_up_to_n(n: int) -> None:
    # Small integers keep every intermediate exact, so H·H = n·I holds bit for bit.
    rng = np.random.default_rng(7)
    x = rng.integers(-8, 9, size=(6, n)).astype(np.float64)
    np.testing.assert_array_equal(fwht(fwht(x)), n * x)
    xt = torch.from_numpy(x).to(torch.float32)
    torch.testing.assert_close(fwht(fwht(xt)), n * xt, rtol=0, atol=0)
    # normalized transform is orthogonal and its own inverse
    z = rng.standard_normal((4, n))
    np.testing.assert_allclose(fwht(fwht(z, normalize=True), normalize=True), z, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(fwht(z, normalize=True), axis=-1),
                               np.linalg.norm(z, axis=-1), rtol=1e-12)


def test_fwht_keeps_half_dtype_and_handles_views() -> None:
    x = torch.randn(8, 16)
    y = fwht(x.to(torch.float16))
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), fwht(x), rtol=2e-2, atol=2e-2)
    # A non-contiguous input (a transpose) is transformed along its logical last dim.
    xt = torch.randn(32, 5).T
    torch.testing.assert_close(fwht(xt), xt.contiguous() @ torch.from_numpy(
        hadamard_matrix(32)).float(), rtol=1e-5, atol=1e-5)
    # One-element transform is the identity but never aliases its input.
    one = np.ones((3, 1))
    out = fwht(one)
    out[0, 0] = 5.0
    assert one[0, 0] == 1.0
    t1 = torch.ones(3, 1)
    fwht(t1).fill_(5.0)
    assert float(t1[0, 0]) == 1.0


@pytest.mark.parametrize("n", [0, 3, 6, 1000])
def test_fwht_rejects_non_power_of_two(n: int) -> None:
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(np.zeros((2, n)))
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(2, n))
    with pytest.raises(TypeError):
        fwht([1.0, 2.0])  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fwht_cuda_matches_cpu() -> None:
    x = torch.randn(16, 256)
    y = fwht(x.cuda())
    assert y.device.type == "cuda"
    torch.testing.assert_close(y.cpu(), fwht(x), rtol=1e-5, atol=1e-4)
