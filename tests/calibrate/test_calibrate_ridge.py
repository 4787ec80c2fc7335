"""Ridge fitting with an unpenalised bias, from streamed normal equations (DESIGN §3)."""

from __future__ import annotations

import numpy as np
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
