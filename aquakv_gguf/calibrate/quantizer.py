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
_QDQ_CHUNK = 1 << 18  # elements per quantize-dequantize chunk (its temporaries stay in L2/L3 cache)


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
        unique = np.where(sizes == 1, order[:, 0], -1).reshape(self.n_cells, self.n_cells)
        # Pairs outside the table are clamped into its edge cells: marking those ambiguous sends
        # them to the slow path, which tells inside from outside, so the fast path needs no test.
        unique[[0, -1], :] = -1
        unique[:, [0, -1]] = -1
        self.unique = torch.from_numpy(unique.reshape(-1).astype(np.int64))


@functools.lru_cache(maxsize=16)
def _table_for(grid_bytes: bytes, n_points: int) -> _CandidateTable:
    return _CandidateTable(np.frombuffer(grid_bytes, dtype=np.float32).reshape(n_points, 2))


class RowQuantizer:
    """HIGGS with grid ``[n, d]`` and groups of ``group_size``: ``q(x: [..., C]) -> x_hat [..., C]`` f32."""

    def __init__(self, grid: np.ndarray, group_size: int, group_perm: np.ndarray | None = None):
        """``group_perm`` (a permutation of ``range(group_size)``, optional): quantize every group
        in that channel order, i.e. ``x_g ↦ Pᵀ q(P x_g)`` with ``(P x)_i = x[group_perm[i]]``, by
        folding P into the Hadamard matrices (no gathers; see ``KeyOrderQuantizer.folded``).
        """
        self.grid_np = np.ascontiguousarray(grid, dtype=np.float32)
        if self.grid_np.ndim != 2:
            raise ValueError(f"grid must be [n_points, dim], got {self.grid_np.shape}")
        self.n_points, self.dim = self.grid_np.shape
        self.group_size = int(group_size)
        if self.group_size & (self.group_size - 1) or self.group_size % self.dim:
            raise ValueError(f"group size {group_size} must be a power of two and a multiple of {self.dim}")
        h = hadamard_matrix(self.group_size).astype(np.float32)
        self.group_perm = None if group_perm is None else np.asarray(group_perm, dtype=np.int64)
        if self.group_perm is None:
            h_enc = h_dec = h
        else:
            if sorted(self.group_perm.tolist()) != list(range(self.group_size)):
                raise ValueError(f"group_perm must be a permutation of range({self.group_size})")
            inv = np.argsort(self.group_perm)
            # y = (P x) H = x (H[inv, :]);  x̂ = Pᵀ(ŷ H) = ŷ (H[:, inv]).
            h_enc, h_dec = np.ascontiguousarray(h[inv, :]), np.ascontiguousarray(h[:, inv])
        self._h = torch.from_numpy(h_enc)
        self._h_dec = torch.from_numpy(h_dec)
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
            self._dev[device] = (g, 2.0 * g, (g * g).sum(dim=1), self._h.to(device), cand, self._h_dec.to(device))
        return self._dev[device]

    @torch.no_grad()
    def nearest(self, y: torch.Tensor) -> torch.Tensor:
        """Index of the grid point maximising ``2·y·g − ‖g‖²`` (first on ties) for ``y: [P, d]``: int64 [P]."""
        _g, g2, gnorm, _h, cand, _hd = self._on(y.device)
        if cand is None:
            return self._exhaustive(y, g2, gnorm, torch.empty(y.shape[0], dtype=torch.int64, device=y.device))
        cand, unique, feats = cand
        n_cells = self._table.n_cells
        # Cell coordinates, clamped, then the flat cell index as one [P, 2] @ [2] product (exact
        # in float32: < 2^24); a pair on a cell border may land in the neighbouring cell, which the
        # candidate lists' margin covers.
        cf = torch.mul(y, 1.0 / _TABLE_CELL).add_(_TABLE_HALF_WIDTH / _TABLE_CELL).floor_().clamp_(0, n_cells - 1)
        idx = torch.mv(cf, torch.tensor([float(n_cells), 1.0], device=y.device)).long()
        out = unique.index_select(0, idx)
        todo = torch.nonzero(out < 0).squeeze(1)
        if todo.numel():
            yt = y.index_select(0, todo)
            inside = yt.abs().amax(dim=1) < _TABLE_HALF_WIDTH
            out[todo] = self._candidates(yt, idx.index_select(0, todo), inside, cand, feats, g2, gnorm)
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
        h = self._on(x.device)[3]
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
        g, h = self._on(codes.device)[0], self._on(codes.device)[5]
        c = codes.shape[-1] * self.dim
        n_groups = c // self.group_size
        pts = g.index_select(0, codes.reshape(-1).long()).reshape(-1, n_groups, self.group_size)
        x_hat = ((pts * scales.reshape(-1, n_groups, 1).to(torch.float32)) @ h) / self.group_size
        return x_hat.reshape(*codes.shape[:-1], c)

    @torch.no_grad()
    def _qdq(self, rows: torch.Tensor) -> torch.Tensor:
        """``decode(encode(rows))`` for float32 ``rows: [n, C]`` without the int32/f16 round trips.

        The same float operations as encode/decode (so the same reconstruction), minus passes
        that do not change it: a group whose f16 norm is 0 decodes to 0 whatever its code, so
        y needs no masking; ``(pts·s)/G`` equals ``pts·(s/G)`` exactly (G is a power of two).
        """
        g, _g2, _gn, h, _cand, h_dec = self._on(rows.device)
        c = rows.shape[-1]
        ng = c // self.group_size
        xg = rows.reshape(-1, ng, self.group_size)
        s16 = torch.linalg.vector_norm(xg, dim=-1).to(torch.float16)
        if not bool(torch.isfinite(s16).all()):
            raise ValueError("a group norm is not finite in float16: cannot quantize")
        s = s16.to(torch.float32).unsqueeze(-1)  # [n, ng, 1]
        y = torch.matmul(xg, h).div_(torch.where(s > 0, s, torch.ones_like(s)))
        pts = g.index_select(0, self.nearest(y.view(-1, self.dim))).view(-1, ng, self.group_size)
        return torch.matmul(pts.mul_(s.mul_(1.0 / self.group_size)), h_dec).view(-1, c)

    def _check_width(self, c: int) -> None:
        if c % self.group_size:
            raise ValueError(f"{c} channels do not split into groups of {self.group_size}")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``x: [..., C]`` -> ``x_hat`` float32, same shape."""
        shape = x.shape
        self._check_width(shape[-1])
        rows = x.reshape(-1, shape[-1])
        out = torch.empty(rows.shape, dtype=torch.float32, device=x.device)
        step = max(1, _QDQ_CHUNK // shape[-1])
        for s in range(0, rows.shape[0], step):
            out[s:s + step] = self._qdq(rows[s:s + step].to(torch.float32))
        return out.reshape(shape)

    @torch.no_grad()
    def quantize_residual(self, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """``pred + Q(x − pred)`` for one chunk of rows ``x, pred: [n, C]`` (float32)."""
        self._check_width(x.shape[-1])
        return self._qdq(x - pred).add_(pred)

    @torch.no_grad()
    def residual(self, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """``pred + Q(x − pred)`` for ``x, pred: [N, C]`` (DESIGN §3), chunk by chunk (no full-size temporaries)."""
        self._check_width(x.shape[-1])
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        step = max(1, _QDQ_CHUNK // x.shape[-1])
        for s in range(0, x.shape[0], step):
            p = pred[s:s + step]
            out[s:s + step] = self._qdq(x[s:s + step] - p).add_(p)
        return out


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
        self.perm_np = np.asarray(perm, dtype=np.int64)
        self.perm = torch.as_tensor(self.perm_np, dtype=torch.long)
        self.inv = torch.argsort(self.perm)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        perm, inv = self.perm.to(x.device), self.inv.to(x.device)
        return self.q(x.index_select(-1, perm)).index_select(-1, inv)

    def residual(self, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """``pred + Pᵀ q(P (x − pred))`` for ``x, pred: [N, C]``."""
        return pred + self(x - pred)

    quantize_residual = residual

    def folded(self) -> RowQuantizer | KeyOrderQuantizer:
        """An equivalent quantizer without the two gathers, when the permutation allows it.

        When ``perm`` maps every quantizer group onto itself with the same in-group order (true
        for llama.cpp's key permutation whenever the group size is a multiple of head_dim), the
        permutation folds into the Hadamard matrices: a RowQuantizer with ``group_perm`` that
        takes and returns Hugging Face order.  Same arithmetic up to float summation order (the
        codes can differ from this wrapper's on exact score ties only): calibration uses it; the
        reference cache keeps this wrapper.  Returns ``self`` when the permutation does not fold.
        """
        g, c = self.q.group_size, self.perm_np.size
        if c % g:
            return self
        rel = self.perm_np[:g]
        for start in range(0, c, g):
            if not np.array_equal(self.perm_np[start:start + g], rel + start):
                return self
        if sorted(rel.tolist()) != list(range(g)):
            return self
        return RowQuantizer(self.q.grid_np, g, group_perm=rel)


def key_quantizer(quantizer: RowQuantizer, n_kv_heads: int, head_dim: int, permutes_qk: bool, *,
                  folded: bool = False):
    """The quantizer for keys of a model whose recipe has ``llama_cpp_permutes_qk`` (else ``quantizer``).

    ``folded``: the faster equivalent of ``KeyOrderQuantizer.folded`` where it applies.
    """
    if not permutes_qk:
        return quantizer
    from aquakv_gguf.gguf_io.params import llama_cpp_key_permutation
    kq = KeyOrderQuantizer(quantizer, llama_cpp_key_permutation(n_kv_heads, head_dim))
    return kq.folded() if folded else kq
