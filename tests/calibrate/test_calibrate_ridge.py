"""Ridge fitting with an unpenalised bias, from streamed normal equations (DESIGN §3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aquakv_gguf.calibrate.ridge import RidgeAccumulator, fit_ridge


def planted(n: int, d_in: int, d_out: int, noise: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(d_out, generator=g) * 3.0
    # Inputs with a large common offset, like pre-RoPE keys: the bias must absorb it.
    x = torch.randn(n, d_in, generator=g) * (0.5 + torch.rand(d_in, generator=g)) + 5.0
    y = x @ w.T + b + noise * torch.randn(n, d_out, generator=g)
    return x, y, w, b


def test_recovers_a_planted_linear_map_to_the_noise_level() -> None:
    noise = 0.05
    x, y, w, b = planted(20000, 48, 32, noise)
    w_hat, b_hat = fit_ridge(x, y, reg=1e-3)
    x_new, y_new, _, _ = planted(5000, 48, 32, noise, seed=0)
    y_true = x_new @ w.T + b
    err = ((x_new @ w_hat.T + b_hat) - y_true).pow(2).mean().item()
    # Estimation error of least squares ~ noise² · d_in / n, far below the noise itself.
    assert err < 0.05 * noise ** 2
    rel_w = ((w_hat - w).norm() / w.norm()).item()
    assert rel_w < 0.01
    resid = ((x_new @ w_hat.T + b_hat) - y_new).pow(2).mean().item()
    assert abs(resid / noise ** 2 - 1) < 0.1


def test_regulariser_is_reg_times_mean_diag_of_centred_xtx() -> None:
    x, y, _, _ = planted(300, 16, 8, 0.5, seed=3)
    reg = 0.2  # large, so the penalty visibly matters
    w_hat, b_hat = fit_ridge(x, y, reg=reg)
    xd, yd = x.double().numpy(), y.double().numpy()
    xa = np.concatenate([xd, np.ones((xd.shape[0], 1))], axis=1)
    xc = xd - xd.mean(0)
    lam = reg * np.mean(np.diag(xc.T @ xc))
    pen = np.diag(np.r_[np.full(16, lam), 0.0])  # the bias is not penalised
    theta = np.linalg.solve(xa.T @ xa + pen, xa.T @ yd)
    np.testing.assert_allclose(w_hat.numpy(), theta[:16].T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b_hat.numpy(), theta[16], rtol=1e-4, atol=1e-5)


def test_streaming_equals_one_shot() -> None:
    x, y, _, _ = planted(5000, 24, 12, 0.1, seed=1)
    acc = RidgeAccumulator(24, 12)
    for s in range(0, 5000, 777):
        acc.add(x[s:s + 777], y[s:s + 777])
    w1, b1 = acc.solve(1e-3)
    w2, b2 = fit_ridge(x, y, reg=1e-3, chunk=100000)
    torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b1, b2, rtol=1e-5, atol=1e-5)


def test_block_diagonal_fit_recovers_a_planted_block_map_with_exact_zeros() -> None:
    """``--predictor-block N``: each output block is fitted on its own input block; the rest is exactly 0."""
    from aquakv_gguf.calibrate.ridge import block_indices
    from aquakv_gguf.gguf_io.params import off_block_max

    g = torch.Generator().manual_seed(5)
    c, block, noise = 48, 16, 0.05
    w = torch.zeros(c, c)
    for j in range(c // block):
        s = slice(j * block, (j + 1) * block)
        w[s, s] = torch.randn(block, block, generator=g) / block ** 0.5
    b = torch.randn(c, generator=g)
    # Correlated inputs across blocks, so that a dense fit would not be block-diagonal by chance.
    mix = torch.eye(c) + 0.3 * torch.randn(c, c, generator=g) / c ** 0.5
    x = torch.randn(20000, c, generator=g) @ mix.T + 2.0
    y = x @ w.T + b + noise * torch.randn(20000, c, generator=g)
    acc = RidgeAccumulator(c, c)
    acc.add(x, y)
    w_hat, b_hat = acc.solve(1e-3, block_indices(c, block))
    assert off_block_max(w_hat.numpy(), block) == 0.0
    assert ((w_hat - w).norm() / w.norm()).item() < 0.01
    torch.testing.assert_close(b_hat, b, atol=0.02, rtol=0)
    # Each block is exactly the ridge fit on that block's inputs alone (its own λ included).
    for j in range(c // block):
        s = slice(j * block, (j + 1) * block)
        wj, bj = fit_ridge(x[:, s], y[:, s], reg=1e-3)
        torch.testing.assert_close(w_hat[s, s], wj, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b_hat[s], bj, rtol=1e-4, atol=1e-4)
    # Two stacked inputs (the value predictor's [k̂_l ; v̂_{l-1}]): block j sees channel block j of both.
    blocks2 = block_indices(c, block, n_inputs=2)
    assert torch.equal(blocks2[1][0], torch.cat([torch.arange(16, 32), torch.arange(64, 80)]))
    with pytest.raises(ValueError, match="divide"):
        block_indices(c, 20)
