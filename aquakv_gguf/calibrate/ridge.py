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

    def solve(self, reg: float, blocks: list[tuple[torch.Tensor, torch.Tensor]] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W [d_out, d_in], b [d_out])`` float32 minimising the ridge objective above.

        ``blocks`` (see ``solve_ridge``) restricts each output block to its own input channels.
        """
        if self.n == 0:
            raise ValueError("no training samples were added")
        n = float(self.n)
        mx, my = self.sx / n, self.sy / n
        cxx = self.xx - n * torch.outer(mx, mx)  # centred Gram matrix X_cᵀX_c
        cxy = self.xy - n * torch.outer(mx, my)
        wt, b = solve_ridge(cxx, cxy, mx + self.x_shift.double(), my + self.y_shift.double(), reg, blocks)
        return wt, b


def solve_ridge(cxx: torch.Tensor, cxy: torch.Tensor, mx: torch.Tensor, my: torch.Tensor, reg: float,
                blocks: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge solution from centred moments: ``(W [d_out, d_in], b [d_out])`` float32.

    cxx: ``X_cᵀX_c [d_in, d_in]``, cxy: ``X_cᵀY_c [d_in, d_out]`` (float64, centred on the
    training means), mx: ``[d_in]``, my: ``[d_out]`` the training means.  λ = reg · mean(diag(cxx))
    over the inputs a block sees.  ``blocks``: ``[(in_idx, out_idx)]`` (int64 index tensors): each
    output block is fitted on its input block alone and every other weight is exactly zero
    (block-diagonal predictors); None fits one dense block.
    """
    d_in, d_out = cxy.shape
    device = cxy.device
    if blocks is None:
        blocks = [(torch.arange(d_in), torch.arange(d_out))]
    # The solves are tiny ([d_in, d_in]); float64 on the CPU whatever the device.
    wt = torch.zeros(d_in, d_out, dtype=torch.float64)
    cxx, cxy, mx, my = (t.detach().to("cpu", torch.float64) for t in (cxx, cxy, mx, my))
    for in_idx, out_idx in blocks:
        in_idx, out_idx = in_idx.cpu(), out_idx.cpu()
        a = cxx.index_select(0, in_idx).index_select(1, in_idx)
        rhs = cxy.index_select(0, in_idx).index_select(1, out_idx)
        lam = reg * torch.diagonal(a).mean().clamp_min(1e-30)
        a = a + lam * torch.eye(a.shape[0], dtype=torch.float64)
        try:
            sol = torch.cholesky_solve(rhs, torch.linalg.cholesky(a))
        except RuntimeError:
            # Only when every input is identical (zero variance): least squares copes.
            sol = torch.linalg.lstsq(a, rhs).solution
        wt[in_idx[:, None], out_idx[None, :]] = sol
    b = my - mx @ wt
    return wt.T.float().contiguous().to(device), b.float().to(device)


def block_indices(n_channels: int, block: int, n_inputs: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Blocks of a block-diagonal predictor with ``n_inputs`` stacked ``[C]`` inputs and a ``[C]`` output.

    Output block j (channels ``[j·N, (j+1)·N)``) sees the same channels of every input; for the
    value predictor (inputs ``[k̂_l ; v̂_{l-1}]``) that is ``j·N + [0, N)`` and ``C + j·N + [0, N)``.
    """
    if block <= 0 or n_channels % block:
        raise ValueError(f"predictor block size {block} must divide C = {n_channels}")
    out = []
    for j in range(n_channels // block):
        own = torch.arange(j * block, (j + 1) * block)
        out.append((torch.cat([own + i * n_channels for i in range(n_inputs)]), own))
    return out


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
        # float32 with torch's cascade summation (relative error ~1e-7), summed across calls in float64.
        d = y.float() - y_hat.float()
        y32 = y.float()
        self.err += float(torch.sum(d * d))
        self.ref += float(torch.sum(y32 * y32))
        self.n += y.shape[0]

    @property
    def rel(self) -> float:
        return self.err / self.ref if self.ref > 0 else float("nan")
