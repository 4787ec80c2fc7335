"""Gaussian-MSE-optimal vector-quantization grids (codebooks) for the HIGGS quantizer.

``gaussian_grid(n, dim)`` returns ``n`` points in R^dim that (locally) minimise the
per-dimension distortion ``E‖z − nearest(z)‖² / dim`` for ``z ~ N(0, I_dim)``: k-means++
starts from a fixed-seed sample, then Lloyd's algorithm with *exact* cell expectations (2-D:
Voronoi polygons and edge integrals, see :class:`_Gaussian2D`; 1-D: intervals and erf), so
the result carries no sampling noise. Other dimensions fall back to Lloyd over a fixed
2^17-point sample (slow, and unused by this project). Exact per-dimension distortion of the
built 2-D grids: 0.10760 (16 points), 0.02964 (64), 0.007769 (256).

Determinism: the starts use numpy's PCG64 stream with fixed seeds; every later step is
element-wise float64 arithmetic in a fixed order (no BLAS, whose summation order varies by
machine), sequential sums and transcendental functions (erf, exp, arctan, cos) that may differ
by an ulp between math libraries. The final points are rounded to multiples of 2^-16 (exact in
float32, far below the grid's own distortion), which absorbs such ulp-level differences, and
sorted lexicographically (by the first coordinate, then the second, ...) so index ``i`` means
the same point everywhere.

Caching: in memory (``functools.lru_cache``) and on disk as ``.npy`` under
``$AQUAKV_CACHE_DIR`` or ``$XDG_CACHE_HOME/aquakv`` or ``~/.cache/aquakv``, in ``grids/``,
keyed by n, dim and :data:`GRID_ALGO_VERSION` (bump it whenever the construction changes, so
stale grids are never reused). An unwritable cache folder only costs a rebuild.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

GRID_ALGO_VERSION = 1
"""Part of the on-disk cache key; bump on any change to the construction."""

_ROUND_STEP = 2.0 ** -16
_INIT_SAMPLE = 1 << 13  # k-means++ draws its starting points from this many fixed normals
_SCREEN_ITERS = 50  # Lloyd iterations before restarts are compared
_MAX_POINTS = 4096


def _restarts_and_iters(n_points: int) -> tuple[int, int]:
    """Number of k-means++ restarts and the Lloyd iteration cap for a grid of ``n_points``.

    Small grids are cheap and have distinct local optima (16 points in 2-D: 0.1076 for the
    1 + 6 + 9 ring layout, up to 0.1096 for others; 64 points: 0.0296 to 0.0298), so they get
    restarts; big ones converge slowly but their local optima lie within a fraction of a
    percent of each other.
    """
    if n_points <= 32:
        return 4, 200
    if n_points <= 128:
        return 3, 200
    return 1, 150


# ----------------------------------------------------------------------------- cache

def grid_cache_dir() -> Path:
    """``$AQUAKV_CACHE_DIR`` or ``$XDG_CACHE_HOME/aquakv`` or ``~/.cache/aquakv``, plus ``grids``.

    Not created here: writing is best-effort (see :func:`gaussian_grid`).
    """
    env = os.environ.get("AQUAKV_CACHE_DIR")
    if env:
        base = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "aquakv"
    return base / "grids"


def grid_cache_path(n_points: int, dim: int = 2) -> Path:
    """Where the disk cache keeps the grid of ``n_points`` in R^``dim``."""
    return grid_cache_dir() / f"gaussian_n{n_points}_d{dim}_v{GRID_ALGO_VERSION}.npy"


def _check_args(n_points: int, dim: int) -> None:
    if not isinstance(n_points, (int, np.integer)) or not 1 <= n_points <= _MAX_POINTS:
        raise ValueError(f"a grid needs an integer number of points in [1, {_MAX_POINTS}], "
                         f"got {n_points!r}")
    if not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"a grid needs a positive integer dimension, got {dim!r}")


def _load_cached(path: Path, n_points: int, dim: int) -> np.ndarray | None:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if arr.shape != (n_points, dim) or arr.dtype != np.float32 or not np.isfinite(arr).all():
        return None  # a truncated or foreign file: rebuild rather than trust it
    return arr


def _store_cached(path: Path, grid: np.ndarray) -> None:
    # Write-then-rename: concurrent builders both produce the same bytes, and a reader never
    # sees half a file.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, grid, allow_pickle=False)
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"could not cache the quantization grid at {path}: {exc}", stacklevel=3)


@functools.lru_cache(maxsize=None)
def gaussian_grid(n_points: int, dim: int = 2) -> np.ndarray:
    """The MSE-optimal grid for N(0, I_dim): ``[n_points, dim]`` float32, read-only.

    Loaded from the disk cache when present, else built (:func:`build_gaussian_grid`; a few
    seconds for 256 points in 2-D) and stored there. Copy it before modifying.
    """
    _check_args(n_points, dim)
    path = grid_cache_path(int(n_points), int(dim))
    grid = _load_cached(path, int(n_points), int(dim))
    if grid is None:
        grid = build_gaussian_grid(int(n_points), int(dim))
        _store_cached(path, grid)
    grid.setflags(write=False)
    return grid


# ----------------------------------------------------------------------------- build

def build_gaussian_grid(n_points: int, dim: int = 2) -> np.ndarray:
    """Build (no caching) the Gaussian-MSE-optimal grid: ``[n_points, dim]`` float32.

    k-means++ initialisations from a fixed-seed normal sample, each followed by Lloyd
    iterations against the Gaussian measure (exact for dim 1 and 2, a fixed 2^17-point normal
    sample otherwise); the restart with the lowest distortion wins. Deterministic, see the
    module docstring. In 2-D about 1-2 s for 16 or 64 points and 3-5 s for 256 points on one
    busy CPU core.
    """
    _check_args(n_points, dim)
    n_points, dim = int(n_points), int(dim)
    measure: _Gaussian1D | _Gaussian2D | _SampleMeasure
    if dim == 1:
        measure = _Gaussian1D()
    elif dim == 2:
        measure = _Gaussian2D()
    else:
        measure = _SampleMeasure(dim)
    restarts, max_iters = _restarts_and_iters(n_points)
    # Restarts are screened after a few iterations (their basins are apparent by then); only
    # the winner runs to the full count.
    screen = min(_SCREEN_ITERS, max_iters) if restarts > 1 else max_iters
    best, best_mse = None, np.inf
    for seed in range(restarts):
        grid = _lloyd(_kmeanspp_init(n_points, dim, seed), measure, screen)
        mse = measure.distortion(grid)
        if mse < best_mse:  # strict: the earliest seed wins ties, deterministically
            best, best_mse = grid, mse
    assert best is not None
    if screen < max_iters:
        best = _lloyd(best, measure, max_iters - screen)
    return _canonical(best)


def _canonical(grid: np.ndarray) -> np.ndarray:
    rounded = np.round(grid / _ROUND_STEP) * _ROUND_STEP
    order = np.lexsort(rounded.T[::-1])  # first coordinate is the primary key
    return np.ascontiguousarray(rounded[order], dtype=np.float32)


def _kmeanspp_init(n_points: int, dim: int, seed: int) -> np.ndarray:
    """k-means++ seeding (D² sampling) over a fixed normal sample: ``[n_points, dim]`` float64."""
    rng = np.random.default_rng([0xA9A, seed])
    sample = rng.standard_normal((_INIT_SAMPLE, dim))
    chosen = [int(rng.integers(_INIT_SAMPLE))]
    d2 = ((sample - sample[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(n_points - 1):
        # Inverse-CDF draw instead of rng.choice(p=...), whose internals may change.
        cdf = np.cumsum(d2)
        pick = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        pick = min(pick, _INIT_SAMPLE - 1)
        chosen.append(pick)
        d2 = np.minimum(d2, ((sample - sample[pick]) ** 2).sum(axis=1))
    return sample[chosen].copy()


def _lloyd(grid: np.ndarray, measure: "_Gaussian1D | _Gaussian2D | _SampleMeasure",
           max_iters: int, tol: float = 1e-9) -> np.ndarray:
    """Lloyd iterations: move each point to the (measure-weighted) centroid of its cell."""
    grid = grid.astype(np.float64, copy=True)
    for _ in range(max_iters):
        mass, moment = measure.cell_moments(grid)
        filled = mass > 0.0
        new = grid.copy()
        # An empty cell keeps its point; the next restart or iteration may still use it.
        new[filled] = moment[filled] / mass[filled, None]
        shift = np.abs(new - grid).max()
        grid = new
        if shift < tol:
            break
    return grid


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(24)
_ERF = np.frompyfunc(math.erf, 1, 1)  # libm's erf: numpy has none, and torch's varies by CPU
_TWO_PI = 2.0 * math.pi


def _erf(x: np.ndarray) -> np.ndarray:
    return _ERF(x).astype(np.float64)


def _clip_convex(poly: np.ndarray, count: np.ndarray, a: np.ndarray, b: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Sutherland–Hodgman clip of convex polygons by the half-planes ``a·z <= b``.

    ``poly: [R, V, 2]`` counter-clockwise vertices padded past ``count: [R]``; ``a: [R, 2]``,
    ``b: [R]``. Returns the clipped ``[R, V', 2]`` (still counter-clockwise) and counts.
    """
    rows, width, _ = poly.shape
    k = np.arange(width)[None, :]
    valid = k < count[:, None]
    nxt = np.where(k + 1 < count[:, None], k + 1, 0)
    side = poly[..., 0] * a[:, None, 0] + poly[..., 1] * a[:, None, 1] - b[:, None]
    side_next = np.take_along_axis(side, nxt, axis=1)
    poly_next = np.take_along_axis(poly, nxt[..., None], axis=1)
    keep = valid & (side <= 0.0)
    cross = valid & (((side < 0.0) & (side_next > 0.0)) | ((side > 0.0) & (side_next < 0.0)))
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(cross, side / (side - side_next), 0.0)
    inter = poly + frac[..., None] * (poly_next - poly)
    # Each edge emits its start vertex (if kept) then its crossing point (if any), in order.
    cand = np.stack((poly, inter), axis=2).reshape(rows, 2 * width, 2)
    emit = np.stack((keep, cross), axis=2).reshape(rows, 2 * width)
    new_count = emit.sum(axis=1)
    slot = np.cumsum(emit, axis=1) - 1
    out = np.zeros((rows, int(new_count.max()), 2))
    r_idx, c_idx = np.nonzero(emit)
    out[r_idx, slot[r_idx, c_idx]] = cand[r_idx, c_idx]
    return out, new_count


class _Gaussian2D:
    """Exact N(0, I_2) cell integrals over the Voronoi cells of a 2-D grid.

    Cells are built by clipping a box of half-width 10 (outside it the Gaussian has mass
    below 1e-21) with the perpendicular bisectors to the other points. Integrals use the
    divergence theorem, edge by edge: with p the density,
    ``∫_V z p = −∮ p·n ds`` (since ∇p = −z p), a closed form with erf; and the mass and second
    moment are the signed sums, over edges, of the Gaussian integrals over the triangle
    (origin, edge), in polar form ``(1/2π)∫ F(r(φ)) dφ`` with
    ``F = 1 − e^{−r²/2}`` (mass) or ``2 − (r² + 2)·e^{−r²/2}`` (E‖z‖²), by Gauss–Legendre
    quadrature over the angle (smooth, bounded integrands: 24 nodes are exact to ~1e-10).
    """

    box = 10.0
    first_neighbours = 12

    def voronoi(self, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Voronoi cells, box-clipped: ``[n, V, 2]`` CCW vertices padded past ``count: [n]``."""
        n = grid.shape[0]
        L = self.box
        square = np.array([[-L, -L], [L, -L], [L, L], [-L, L]])
        poly = np.broadcast_to(square, (n, 4, 2)).copy()
        count = np.full(n, 4)
        if n == 1:
            return poly, count
        d2 = ((grid[None, :, :] - grid[:, None, :]) ** 2).sum(axis=-1)  # [n, n]
        np.fill_diagonal(d2, np.inf)
        gnorm = (grid * grid).sum(axis=1)

        def halfplane(i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            # z is at least as close to grid[i] as to grid[j]  <=>  a·z <= b.
            return grid[j] - grid[i], (gnorm[j] - gnorm[i]) / 2.0

        # Clip every cell by its nearest neighbours first: usually all of its true neighbours.
        k_first = min(self.first_neighbours, n - 1)
        # Which k_first points are taken, and in what order, only changes rounding: the pass
        # below adds every other cut.
        near = np.argpartition(d2, k_first - 1, axis=1)[:, :k_first]
        rows = np.arange(n)
        for r in range(k_first):
            poly, count = _clip_convex(poly, count, *halfplane(rows, near[:, r]))
        # Any other point can cut cell i only if it is within twice the cell's radius of
        # grid[i]; test those pairs against the current vertices and clip where they cut. The
        # test is conservative after the first extra clip (cells only shrink), so one pass
        # leaves every cell equal to the intersection of all its bisector half-planes.
        valid = np.arange(poly.shape[1])[None, :] < count[:, None]
        radius2 = np.where(valid, ((poly - grid[:, None, :]) ** 2).sum(axis=-1), 0.0).max(axis=1)
        maybe = d2 <= 4.0 * radius2[:, None] * (1.0 + 1e-9)
        maybe[rows[:, None], near] = False
        pi, pj = np.nonzero(maybe)
        if pi.size:
            a, b = halfplane(pi, pj)
            side = (poly[pi, :, 0] * a[:, None, 0] + poly[pi, :, 1] * a[:, None, 1] - b[:, None])
            cuts = (np.where(valid[pi], side, -np.inf) > 0.0).any(axis=1)
            pi, pj = pi[cuts], pj[cuts]
            # Pairs come out sorted by i: clip rank by rank so each cell gets one cut per step.
            rank = np.arange(pi.size) - np.searchsorted(pi, pi)
            for r in range(int(rank.max()) + 1 if pi.size else 0):
                sel = rank == r
                ci = pi[sel]
                sub, sub_count = _clip_convex(poly[ci], count[ci], *halfplane(ci, pj[sel]))
                if sub.shape[1] > poly.shape[1]:
                    pad = np.zeros((n, sub.shape[1] - poly.shape[1], 2))
                    poly = np.concatenate((poly, pad), axis=1)
                poly[ci, :sub.shape[1]] = sub
                count[ci] = sub_count
        return poly, count

    def _integrals(self, grid: np.ndarray, second: bool
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        poly, count = self.voronoi(grid)
        width = poly.shape[1]
        k = np.arange(width)[None, :]
        nxt = np.where(k + 1 < count[:, None], k + 1, 0)
        start = poly
        end = np.take_along_axis(poly, nxt[..., None], axis=1)
        edge = end - start
        length = np.hypot(edge[..., 0], edge[..., 1])
        ok = (k < count[:, None]) & (length > 0.0)
        t = edge / np.where(ok, length, 1.0)[..., None]  # unit direction
        normal = np.stack((t[..., 1], -t[..., 0]), axis=-1)  # outward for CCW cells
        dist = (start * normal).sum(axis=-1)  # signed distance of the edge's line from 0
        u0 = (start * t).sum(axis=-1)
        u1 = (end * t).sum(axis=-1)
        # ∫_edge p ds = e^{−d²/2}/(2π) · sqrt(π/2) · [erf(u/√2)] from u0 to u1
        line = (np.exp(-0.5 * dist * dist) / _TWO_PI * math.sqrt(math.pi / 2.0)
                * (_erf(u1 / math.sqrt(2.0)) - _erf(u0 / math.sqrt(2.0))))
        moment = -(normal * np.where(ok, line, 0.0)[..., None]).sum(axis=1)
        # Triangle (origin, edge) in polar form: u = |d|·tan φ, r = |d| / cos φ.
        absd = np.abs(dist)
        use = ok & (absd > 0.0)
        safe = np.where(use, absd, 1.0)
        phi0, phi1 = np.arctan(u0 / safe), np.arctan(u1 / safe)
        half = (phi1 - phi0)[..., None] / 2.0
        phi = (phi0 + phi1)[..., None] / 2.0 + half * _GL_NODES
        r2 = (safe[..., None] / np.cos(phi)) ** 2
        decay = np.exp(-0.5 * r2)
        scale = np.where(use, np.sign(dist), 0.0) / _TWO_PI
        mass = ((((1.0 - decay) * _GL_WEIGHTS).sum(axis=-1) * half[..., 0]) * scale).sum(axis=1)
        second_moment = None
        if second:
            f2 = 2.0 - (r2 + 2.0) * decay
            second_moment = (((f2 * _GL_WEIGHTS).sum(axis=-1) * half[..., 0]) * scale).sum(axis=1)
        return mass, moment, second_moment

    def cell_moments(self, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per grid point: cell mass ``[n]`` and first moment ``[n, 2]``."""
        mass, moment, _ = self._integrals(grid, second=False)
        return mass, moment

    def distortion(self, grid: np.ndarray) -> float:
        """Exact per-dimension MSE ``E‖z − nearest(z)‖² / 2``."""
        mass, moment, second = self._integrals(grid, second=True)
        assert second is not None
        per_cell = second - 2.0 * (grid * moment).sum(axis=1) + (grid * grid).sum(axis=1) * mass
        return float(per_cell.sum() / 2.0)


class _Gaussian1D:
    """Exact N(0, 1) integrals over the intervals between midpoints of a 1-D grid."""

    def _edges(self, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        order = np.argsort(grid[:, 0], kind="stable")
        x = grid[order, 0]
        mids = (x[1:] + x[:-1]) / 2.0
        return order, np.concatenate(([-np.inf], mids)), np.concatenate((mids, [np.inf]))

    @staticmethod
    def _cdf_pdf(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
        pdf = np.where(np.isfinite(z), np.exp(-0.5 * np.where(np.isfinite(z), z, 0.0) ** 2), 0.0)
        return cdf, pdf / math.sqrt(_TWO_PI)

    def cell_moments(self, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order, lo, hi = self._edges(grid)
        (c0, p0), (c1, p1) = self._cdf_pdf(lo), self._cdf_pdf(hi)
        mass = np.empty(grid.shape[0])
        moment = np.empty((grid.shape[0], 1))
        mass[order] = c1 - c0
        moment[order, 0] = p0 - p1
        return mass, moment

    def distortion(self, grid: np.ndarray) -> float:
        order, lo, hi = self._edges(grid)
        (c0, p0), (c1, p1) = self._cdf_pdf(lo), self._cdf_pdf(hi)
        x = grid[order, 0]
        lo_f, hi_f = np.where(np.isfinite(lo), lo, 0.0), np.where(np.isfinite(hi), hi, 0.0)
        second = (c1 - c0) - (hi_f * p1 - lo_f * p0)  # ∫ z² φ = [Φ − zφ]
        first = p0 - p1
        return float((second - 2.0 * x * first + x * x * (c1 - c0)).sum())


class _SampleMeasure:
    """N(0, I_dim) as a fixed-seed sample ``[2^17, dim]`` (used for dim != 2)."""

    def __init__(self, dim: int, n_samples: int = 1 << 17) -> None:
        rng = np.random.default_rng([0xA9A, 0x5A, dim])
        self.samples = rng.standard_normal((n_samples, dim))

    def assign(self, grid: np.ndarray, chunk: int = 1 << 13) -> np.ndarray:
        out = np.empty(self.samples.shape[0], dtype=np.int64)
        gnorm = (grid * grid).sum(axis=1)
        for start in range(0, self.samples.shape[0], chunk):
            z = self.samples[start:start + chunk]
            # Element-wise accumulation (not BLAS) keeps the result identical across machines.
            score = -gnorm[None, :].copy()
            for j in range(grid.shape[1]):
                score += 2.0 * z[:, j:j + 1] * grid[None, :, j]
            out[start:start + chunk] = score.argmax(axis=1)
        return out

    def cell_moments(self, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = self.assign(grid)
        n, dim = grid.shape
        mass = np.bincount(idx, minlength=n).astype(np.float64) / self.samples.shape[0]
        moment = np.stack([np.bincount(idx, weights=self.samples[:, j], minlength=n)
                           for j in range(dim)], axis=1) / self.samples.shape[0]
        return mass, moment

    def distortion(self, grid: np.ndarray) -> float:
        idx = self.assign(grid)
        return float(((self.samples - grid[idx]) ** 2).mean())


# ----------------------------------------------------------------------------- evaluation

def grid_mse(grid: np.ndarray | torch.Tensor, samples: np.ndarray | torch.Tensor,
             chunk: int = 1 << 16) -> float:
    """Per-dimension MSE of nearest-point quantization of ``samples: [N, d]`` by ``grid: [n, d]``.

    ``mean over samples of ‖z − nearest(z)‖² / d``. The nearest point is found in float32
    (a near-tie picked the other way changes the sum by ~1e-7), the errors are summed in
    float64.
    """
    if isinstance(grid, torch.Tensor):
        grid = grid.detach().cpu().numpy()
    g = torch.tensor(np.asarray(grid), dtype=torch.float64)  # a copy: grids may be read-only
    if isinstance(samples, np.ndarray):
        samples = torch.from_numpy(samples)
    z_all = samples.detach().cpu()
    if g.ndim != 2 or z_all.ndim != 2 or z_all.shape[1] != g.shape[1]:
        raise ValueError(f"grid [n, d] and samples [N, d] disagree: {tuple(g.shape)} vs "
                         f"{tuple(z_all.shape)}")
    g32 = g.to(torch.float32)
    twice_t = (2.0 * g32).T.contiguous()
    neg_norm = -(g32 * g32).sum(dim=1)
    total = 0.0
    for start in range(0, z_all.shape[0], chunk):
        z = z_all[start:start + chunk]
        idx = torch.addmm(neg_norm, z.to(torch.float32), twice_t).argmax(dim=1)
        total += float(((z.to(torch.float64) - g[idx]) ** 2).sum())
    return total / (z_all.shape[0] * g.shape[1])
