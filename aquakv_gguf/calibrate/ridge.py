"""Ridge least squares with an unpenalised bias, from streamed normal equations.

DESIGN §3: the predictor ``y ≈ W @ x + b`` minimises ``Σ‖y − W x − b‖² + λ‖W‖²_F`` with
``λ = reg · mean(diag(X_cᵀX_c))``.  X_c is the training inputs centred on their mean: with an
unpenalised bias, centring is what the fit does anyway (b absorbs the means), and it keeps λ
proportional to the inputs' variance instead of to their squared offsets (pre-RoPE keys carry
large per-channel means that would otherwise swamp λ and over-shrink W).

Only the moments ``Σx``, ``ΣxxᵀΣ``, ``Σxyᵀ``, ``Σy`` and ``n`` are kept (float64), so the
training tokens are added chunk by chunk and memory does not depend on their number.  Each
chunk's products run in float32 on inputs shifted by the first chunk's mean, so large offsets
do not cost precision; the shift is undone exactly in ``solve``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class RidgeAccumulator:
    """Streams the moments of ``y = W @ x + b``.

    add(x: [n, d_in], y: [n, d_out]) may be called any number of times; solve(reg) returns
    ``W: [d_out, d_in]`` and ``b: [d_out]`` (float32, on the accumulator's device).
    """

    def __init__(self, d_in: int, d_out: int, device: torch.device | str = "cpu"):
        self.d_in, self.d_out = d_in, d_out
        self.device = torch.device(device)
        self.x_shift: torch.Tensor | None = None  # [d_in] f32
        self.y_shift: torch.Tensor | None = None  # [d_out] f32
        self.xx = torch.zeros(d_in, d_in, dtype=torch.float64, device=self.device)
        self.xy = torch.zeros(d_in, d_out, dtype=torch.float64, device=self.device)
        self.sx = torch.zeros(d_in, dtype=torch.float64, device=self.device)
        self.sy = torch.zeros(d_out, dtype=torch.float64, device=self.device)
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[1] != self.d_in or y.shape[1] != self.d_out:
            raise ValueError(f"expected x [n, {self.d_in}] and y [n, {self.d_out}], got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[0] == 0:
            return
        x = x.to(self.device, torch.float32)
        y = y.to(self.device, torch.float32)
        if self.x_shift is None:
            self.x_shift, self.y_shift = x.mean(0), y.mean(0)
        xs, ys = x - self.x_shift, y - self.y_shift
        self.xx += (xs.T @ xs).double()
        self.xy += (xs.T @ ys).double()
        self.sx += xs.sum(0).double()
        self.sy += ys.sum(0).double()
        self.n += x.shape[0]

    def solve(self, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W [d_out, d_in], b [d_out])`` float32 minimising the ridge objective above."""
        if self.n == 0:
            raise ValueError("no training samples were added")
        n = float(self.n)
        mx, my = self.sx / n, self.sy / n
        cxx = self.xx - n * torch.outer(mx, mx)  # centred Gram matrix X_cᵀX_c
        cxy = self.xy - n * torch.outer(mx, my)
        lam = reg * torch.diagonal(cxx).mean().clamp_min(1e-30)
        a = (cxx + lam * torch.eye(self.d_in, dtype=torch.float64, device=self.device)).cpu()
        try:
            wt = torch.cholesky_solve(cxy.cpu(), torch.linalg.cholesky(a))
        except RuntimeError:
            # Only when every input is identical (zero variance): least squares copes.
            wt = torch.linalg.lstsq(a, cxy.cpu()).solution
        wt = wt.to(self.device)  # [d_in, d_out]
        b = my - mx @ wt + self.y_shift.double() - self.x_shift.double() @ wt
        return wt.T.float().contiguous(), b.float().contiguous()


def fit_ridge(x: torch.Tensor, y: torch.Tensor, reg: float = 1e-3, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge fit of ``y [n, d_out] ≈ x [n, d_in] @ W.T + b``; returns ``(W [d_out, d_in], b [d_out])``."""
    acc = RidgeAccumulator(x.shape[1], y.shape[1], x.device)
    for s in range(0, x.shape[0], chunk):
        acc.add(x[s:s + chunk], y[s:s + chunk])
    return acc.solve(reg)


@dataclass
class ErrorAccumulator:
    """Σ‖y − ŷ‖² and Σ‖y‖² over streamed rows; ``rel`` is the relative MSE ``Σ‖y−ŷ‖²/Σ‖y‖²``."""

    err: float = 0.0
    ref: float = 0.0
    n: int = 0

    def add(self, y: torch.Tensor, y_hat: torch.Tensor) -> None:
        self.err += float((y.double() - y_hat.double()).pow(2).sum())
        self.ref += float(y.double().pow(2).sum())
        self.n += y.shape[0]

    @property
    def rel(self) -> float:
        return self.err / self.ref if self.ref > 0 else float("nan")
