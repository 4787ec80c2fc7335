"""Fast row-wise HIGGS quantize-dequantize (DESIGN §3) for calibration and the reference cache.

Same semantics as ``aquakv_gguf.quant.HiggsQuantizer`` (per-group f16 norm used as the divisor,
``y = H_G·x_g / s``, nearest grid point by ``argmax 2·y·g − ‖g‖²`` with ties to the lowest index,
``x̂_g = H_G·(s·𝒢[idx]) / G``), computed faster so that calibrating on 256k tokens fits the time
budget on two CPU cores:

- the Hadamard transform is one GEMM with the ±1 Sylvester matrix instead of log2(G) butterfly
  passes (it sums in a different order, so y may differ in the last float bit);
- the nearest-point search for 2-D grids looks up a candidate list per cell of a fine table over
  ``[-L, L]²`` and scores only those candidates with the very same float32 formula.  A grid point
  is a candidate for a cell when it can be nearest to some point of the cell (its distance to the
  cell centre is within ``d_min + cell diagonal + margin``), so the result equals the exhaustive
  argmax; pairs outside the table are scored against the whole grid.

Tests check the search is exactly the exhaustive one and that codes agree with the quant package.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from aquakv_gguf.quant import hadamard_matrix

_TABLE_HALF_WIDTH = 6.0  # |y| coordinates beyond this fall back to the exhaustive search
_TABLE_CELL = 1.0 / 32.0
_MARGIN = 1e-3
_ROW_BUDGET = 1 << 22  # elements of the per-chunk [pairs, candidates] score matrix


def bits_to_points(bits: int, dim: int = 2) -> int:
    """Grid size for ``bits`` bits per value with ``dim``-dimensional grid points (2 bits -> 16)."""
    return 1 << (bits * dim)


class _CandidateTable:
    """Per-cell candidate grid indices for 2-D nearest-point search (see module docstring).

    cand: ``[cells, k_max]`` ascending candidate indices (padded with the row's largest);
    unique: ``[cells]`` the code of cells inside one Voronoi region, -1 where several points compete.
    """

    def __init__(self, grid: np.ndarray):
        g = grid.astype(np.float64)
        self.n_cells = int(round(2 * _TABLE_HALF_WIDTH / _TABLE_CELL))
        centers = (np.arange(self.n_cells) + 0.5) * _TABLE_CELL - _TABLE_HALF_WIDTH
        cx, cy = np.meshgrid(centers, centers, indexing="ij")
        c = np.stack([cx.ravel(), cy.ravel()], axis=1)  # [cells, 2]
        bound = math.sqrt(2) * _TABLE_CELL + _MARGIN  # 2 × half-diagonal + margin
        keep = np.empty((c.shape[0], g.shape[0]), dtype=bool)
        for s in range(0, c.shape[0], 16384):
            d = np.sqrt(((c[s:s + 16384, None, :] - g[None]) ** 2).sum(-1))  # [chunk, n]
            keep[s:s + 16384] = d <= d.min(axis=1, keepdims=True) + bound
        sizes = keep.sum(axis=1)
        self.k_max = int(sizes.max())
        # Stable argsort of "not a candidate" lists each row's candidates first, in ascending order.
        order = np.argsort(~keep, axis=1, kind="stable")[:, : self.k_max]
        last = order[np.arange(order.shape[0]), sizes - 1]
        # Pad with the row's last (largest) index: a duplicate never changes the first-max argmax.
        pad = np.arange(self.k_max)[None, :] >= sizes[:, None]
        order = np.where(pad, last[:, None], order)
        self.cand = torch.from_numpy(order.astype(np.int64))
        self.unique = torch.from_numpy(np.where(sizes == 1, order[:, 0], -1).astype(np.int64))


@functools.lru_cache(maxsize=16)
def _table_for(grid_bytes: bytes, n_points: int) -> _CandidateTable:
    return _CandidateTable(np.frombuffer(grid_bytes, dtype=np.float32).reshape(n_points, 2))


class RowQuantizer:
    """HIGGS with grid ``[n, d]`` and groups of ``group_size``: ``q(x: [..., C]) -> x_hat [..., C]`` f32."""

    def __init__(self, grid: np.ndarray, group_size: int):
        self.grid_np = np.ascontiguousarray(grid, dtype=np.float32)
        if self.grid_np.ndim != 2:
            raise ValueError(f"grid must be [n_points, dim], got {self.grid_np.shape}")
        self.n_points, self.dim = self.grid_np.shape
        self.group_size = int(group_size)
        if self.group_size & (self.group_size - 1) or self.group_size % self.dim:
            raise ValueError(f"group size {group_size} must be a power of two and a multiple of {self.dim}")
        self._h = torch.from_numpy(hadamard_matrix(self.group_size).astype(np.float32))
        self._table = _table_for(self.grid_np.tobytes(), self.n_points) if self.dim == 2 else None
        self._dev: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._dev:
            g = torch.from_numpy(self.grid_np.copy()).to(device)
            cand = None
            if self._table is not None:
                tc = self._table.cand
                g2c = 2.0 * torch.from_numpy(self.grid_np.copy())
                # Per cell, the candidates' 2g_x, 2g_y and ‖g‖² side by side: one row gather per pair.
                feats = torch.cat([g2c[:, 0][tc], g2c[:, 1][tc], (torch.from_numpy(self.grid_np.copy()) ** 2).sum(1)[tc]],
                                  dim=1)
                cand = (tc.to(device), self._table.unique.to(device), feats.to(device))
            self._dev[device] = (g, 2.0 * g, (g * g).sum(dim=1), self._h.to(device), cand)
        return self._dev[device]

    @torch.no_grad()
    def nearest(self, y: torch.Tensor) -> torch.Tensor:
        """Index of the grid point maximising ``2·y·g − ‖g‖²`` (first on ties) for ``y: [P, d]``: int64 [P]."""
        _g, g2, gnorm, _h, cand = self._on(y.device)
        if cand is None:
            return self._exhaustive(y, g2, gnorm, torch.empty(y.shape[0], dtype=torch.int64, device=y.device))
        cand, unique, feats = cand
        n_cells = self._table.n_cells
        inside = y.abs().amax(dim=1) < _TABLE_HALF_WIDTH
        cell = ((y + _TABLE_HALF_WIDTH) * (1.0 / _TABLE_CELL)).floor_().clamp_(0, n_cells - 1).long()
        idx = cell[:, 0] * n_cells + cell[:, 1]
        out = unique.index_select(0, idx)
        out.masked_fill_(~inside, -1)
        todo = torch.nonzero(out < 0).squeeze(1)
        if todo.numel():
            out[todo] = self._candidates(y.index_select(0, todo), idx.index_select(0, todo), inside.index_select(0, todo),
                                         cand, feats, g2, gnorm)
        return out

    def _candidates(self, y: torch.Tensor, idx: torch.Tensor, inside: torch.Tensor, cand: torch.Tensor,
                    feats: torch.Tensor, g2: torch.Tensor, gnorm: torch.Tensor) -> torch.Tensor:
        """Nearest point for pairs in ambiguous cells (candidate lists) or outside the table (all points)."""
        out = torch.empty(y.shape[0], dtype=torch.int64, device=y.device)
        k = self._table.k_max
        rows = max(1, _ROW_BUDGET // k)
        for s in range(0, y.shape[0], rows):
            f = feats.index_select(0, idx[s:s + rows])  # [p, 3k]: 2g_x | 2g_y | ‖g‖²
            part = y[s:s + rows]
            # Same float32 operations, in the same order, as the exhaustive score.
            score = part[:, 0:1] * f[:, :k]
            score += part[:, 1:2] * f[:, k:2 * k]
            score -= f[:, 2 * k:]
            c = cand.index_select(0, idx[s:s + rows])
            out[s:s + rows] = c.gather(1, score.argmax(dim=1, keepdim=True)).squeeze(1)
        outside = torch.nonzero(~inside).squeeze(1)
        if outside.numel():
            out[outside] = self._exhaustive(y.index_select(0, outside), g2, gnorm,
                                            torch.empty(outside.numel(), dtype=torch.int64, device=y.device))
        return out

    def _exhaustive(self, y: torch.Tensor, g2: torch.Tensor, gnorm: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        rows = max(1, _ROW_BUDGET // self.n_points)
        for s in range(0, y.shape[0], rows):
            part = y[s:s + rows]
            score = part[:, 0:1] * g2[:, 0]
            for k in range(1, self.dim):
                score += part[:, k:k + 1] * g2[:, k]
            score -= gnorm
            out[s:s + rows] = score.argmax(dim=1)
        return out

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: [..., C]`` -> ``(codes int32 [..., C/d], scales float16 [..., C/G])``."""
        c = x.shape[-1]
        if c % self.group_size:
            raise ValueError(f"{c} channels do not split into groups of {self.group_size}")
        _g, _g2, _gn, h, _cand = self._on(x.device)
        xg = x.to(torch.float32).reshape(-1, c // self.group_size, self.group_size)
        scales = torch.linalg.vector_norm(xg, dim=-1).to(torch.float16)
        if not bool(torch.isfinite(scales).all()):
            raise ValueError("a group norm is not finite in float16: cannot quantize")
        s = scales.to(torch.float32)[..., None]
        y = torch.where(s > 0, (xg @ h) / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(xg))
        codes = self.nearest(y.reshape(-1, self.dim)).to(torch.int32)
        return codes.reshape(*x.shape[:-1], c // self.dim), scales.reshape(*x.shape[:-1], c // self.group_size)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Inverse of encode: ``float32 [..., C]``."""
        g, _g2, _gn, h, _cand = self._on(codes.device)
        c = codes.shape[-1] * self.dim
        n_groups = c // self.group_size
        pts = g.index_select(0, codes.reshape(-1).long()).reshape(-1, n_groups, self.group_size)
        x_hat = ((pts * scales.reshape(-1, n_groups, 1).to(torch.float32)) @ h) / self.group_size
        return x_hat.reshape(*codes.shape[:-1], c)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        out = torch.empty(rows.shape, dtype=torch.float32, device=x.device)
        step = max(1, (1 << 20) // shape[-1])
        for s in range(0, rows.shape[0], step):
            out[s:s + step] = self.decode(*self.encode(rows[s:s + step]))
        return out.reshape(shape)


class KeyOrderQuantizer:
    """A row quantizer applied in llama.cpp's key-channel order: ``x ↦ Pᵀ·q(P·x)``.

    Keys are quantized in the order the GGUF and the native cache hold them: for Llama-family
    models convert_hf_to_gguf.py permutes each head's K rows (``k_llama = k_hf[perm]``, see
    ``gguf_io.llama_cpp_key_permutation``), and the Hadamard groups of the quantizer are not
    invariant under that permutation. The calibration and the reference cache work in Hugging Face
    order, so they quantize keys through this wrapper to reproduce the native codes exactly.
    """

    def __init__(self, quantizer: RowQuantizer, perm: np.ndarray):
        self.q = quantizer
        self.perm = torch.as_tensor(np.asarray(perm), dtype=torch.long)
        self.inv = torch.argsort(self.perm)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        perm, inv = self.perm.to(x.device), self.inv.to(x.device)
        return self.q(x.index_select(-1, perm)).index_select(-1, inv)


def key_quantizer(quantizer: RowQuantizer, n_kv_heads: int, head_dim: int, permutes_qk: bool):
    """The quantizer for keys of a model whose recipe has ``llama_cpp_permutes_qk`` (else ``quantizer``)."""
    if not permutes_qk:
        return quantizer
    from aquakv_gguf.gguf_io.params import llama_cpp_key_permutation
    return KeyOrderQuantizer(quantizer, llama_cpp_key_permutation(n_kv_heads, head_dim))
