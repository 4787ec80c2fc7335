"""HIGGS quantizer: per-group norm, Hadamard rotation, 2-D grid vector quantization.

Semantics (DESIGN.md §3; the native C/CUDA code must match them). For ``x: [..., C]``, a grid
``𝒢: [n, d]`` (n a power of two) and a group size G (a power of two dividing C, multiple of d):

1. split x into C/G groups ``x_g`` of G consecutive channels;
2. ``s = ‖x_g‖₂`` rounded to float16 and stored as float16. The *rounded* s is also the
   divisor below, so encoder and decoder use the very same scale;
3. ``y = H_G·x_g / s`` with H_G the unnormalised ±1 Sylvester Hadamard matrix
   (:mod:`.hadamard`); ``y = 0`` when ``s == 0``. ‖y‖² = G, so y's coordinates are ≈ N(0, 1);
4. each consecutive pair ``(y[2j], y[2j+1])`` (d-tuple in general) is coded as the index of
   the grid point maximising ``2·y·g − ‖g‖²`` (equivalently nearest), ties to the lowest index;
5. dequantisation: ``x̂_g = H_Gᵀ·(s·𝒢[idx]) / G``.

Everything is computed in float32 on the input's device; the scores are element-wise
products (no matmul, so no TF32 or BLAS-order effects) and the argmax is chunked so that
memory stays bounded for millions of codes.

Bit packing (:func:`pack_codes` / :func:`unpack_codes`), the layout the native code reads:
each row of m codes of ``bits`` bits is one little-endian bitstream. Code i occupies stream
bits ``[i·bits, (i+1)·bits)``, its least significant bit first, and stream bit k is bit
``k mod 8`` (value ``1 << (k mod 8)``) of byte ``k div 8``. A row takes ``ceil(m·bits / 8)``
bytes; the unused high bits of its last byte are zero. Rows are independent (no bits shared
between rows). Example, bits = 6: byte 0 = (c0 | (c1 << 6)) & 0xFF,
byte 1 = ((c1 >> 2) | (c2 << 4)) & 0xFF, byte 2 = (c2 >> 4) | (c3 << 2).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .hadamard import fwht, hadamard_matrix, is_power_of_two

_SCORE_CHUNK_ELEMS = 1 << 23  # scores held at once: [rows, n_points] float32, 32 MiB


def choose_group_size(n_channels: int, head_dim: int) -> int:
    """Group size G for C = ``n_channels`` channels of heads of ``head_dim``.

    C itself when C is a power of two; otherwise the largest power of two dividing C, which
    must be at least ``head_dim`` (groups never get zero padding, which would cost bits).
    E.g. (192, 64) -> 64, (512, 64) -> 512, (1024, 128) -> 1024; (96, 64) raises ValueError.
    """
    if n_channels < 1 or head_dim < 1:
        raise ValueError(f"n_channels and head_dim must be positive, got {n_channels} and "
                         f"{head_dim}")
    if is_power_of_two(n_channels):
        return n_channels
    group = n_channels & -n_channels  # lowest set bit = largest power-of-two divisor
    if group < head_dim:
        raise ValueError(
            f"n_channels={n_channels} is not a power of two and its largest power-of-two "
            f"divisor {group} is smaller than head_dim={head_dim}: no valid group size")
    return group


def bits_per_code(n_points: int) -> int:
    """log2(``n_points``): bits per packed code of a grid with that many points (>= 2)."""
    if n_points < 2 or not is_power_of_two(n_points):
        raise ValueError(f"a grid's point count must be a power of two >= 2, got {n_points}")
    return n_points.bit_length() - 1


def _as_grid_array(grid: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(grid, torch.Tensor):
        grid = grid.detach().cpu().numpy()
    arr = np.asarray(grid, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"a grid must be [n_points, dim], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("the grid has non-finite entries")
    return arr


class HiggsQuantizer:
    """Encode/decode ``[..., C]`` tensors with a ``[n, d]`` grid and groups of ``group_size``.

    ``encode`` returns ``codes: int32 [..., C // d]`` and ``scales: float16 [..., C // G]``;
    ``decode`` maps them back to ``float32 [..., C]``. Works on any torch device (the grid is
    copied to the input's device on first use). See the module docstring for the semantics.
    """

    def __init__(self, grid: np.ndarray | torch.Tensor, group_size: int) -> None:
        arr = _as_grid_array(grid)
        self.n_points, self.dim = int(arr.shape[0]), int(arr.shape[1])
        self.bits = bits_per_code(self.n_points)
        if not is_power_of_two(group_size) or group_size % self.dim != 0:
            raise ValueError(f"group_size must be a power of two and a multiple of the grid "
                             f"dimension {self.dim}, got {group_size}")
        self.group_size = int(group_size)
        self.grid = torch.from_numpy(arr.copy())  # [n, d] float32, CPU
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (f"HiggsQuantizer(n_points={self.n_points}, dim={self.dim}, "
                f"group_size={self.group_size}, bits={self.bits})")

    def _grid_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``grid [n, d]``, ``2·grid [n, d]`` and ``‖g‖² [n]`` on ``device`` (float32)."""
        cached = self._on_device.get(device)
        if cached is None:
            g = self.grid.to(device)
            cached = (g, 2.0 * g, (g * g).sum(dim=1))
            self._on_device[device] = cached
        return cached

    def _check_channels(self, n_channels: int) -> None:
        if n_channels % self.group_size != 0:
            raise ValueError(f"{n_channels} channels do not split into groups of "
                             f"{self.group_size}")

    @torch.no_grad()
    def nearest(self, y: torch.Tensor) -> torch.Tensor:
        """Grid index per d-tuple of ``y: [P, d]`` (float32): ``int32 [P]``.

        argmax over points of ``2·y·g − ‖g‖²``, first maximum (lowest index) on ties; the
        ``[rows, n]`` score matrix is built in chunks to bound memory.
        """
        _, g2, gnorm = self._grid_on(y.device)
        out = torch.empty(y.shape[0], dtype=torch.int32, device=y.device)
        rows = max(1, _SCORE_CHUNK_ELEMS // self.n_points)
        for start in range(0, y.shape[0], rows):
            part = y[start:start + rows]
            score = part[:, 0:1] * g2[:, 0]
            for k in range(1, self.dim):
                score += part[:, k:k + 1] * g2[:, k]
            score -= gnorm
            out[start:start + rows] = score.argmax(dim=1).to(torch.int32)
        return out

    @torch.no_grad()
    def encode(self, x: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize ``x: [..., C]``: ``(codes int32 [..., C // d], scales float16 [..., C // G])``.

        Raises ValueError when a group's norm is not finite in float16 (an inf/nan input or a
        norm above 65504), which would otherwise decode to nan silently.
        """
        x = torch.as_tensor(x)
        if x.ndim < 1:
            raise ValueError("encode expects [..., C], got a scalar")
        n_channels = int(x.shape[-1])
        self._check_channels(n_channels)
        batch = tuple(x.shape[:-1])
        n_groups = n_channels // self.group_size
        xg = x.to(torch.float32).reshape(-1, n_groups, self.group_size)
        scales = torch.linalg.vector_norm(xg, dim=-1).to(torch.float16)  # [B, n_groups]
        if not bool(torch.isfinite(scales).all()):
            raise ValueError("a group norm is not finite in float16 (inf/nan input, or a norm "
                             "above 65504): cannot quantize")
        s = scales.to(torch.float32)[..., None]
        nonzero = s > 0
        y = torch.where(nonzero, fwht(xg) / torch.where(nonzero, s, torch.ones_like(s)),
                        torch.zeros((), dtype=torch.float32, device=x.device))
        codes = self.nearest(y.reshape(-1, self.dim))
        return (codes.reshape(*batch, n_channels // self.dim),
                scales.reshape(*batch, n_groups))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor | np.ndarray,
               scales: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Reconstruct ``float32 [..., C]`` from ``codes [..., C // d]``, ``scales [..., C // G]``.

        The scales are used as given (encode's float16 values); they follow the codes' device.
        """
        codes = torch.as_tensor(codes)
        scales = torch.as_tensor(scales, device=codes.device)
        if codes.ndim < 1 or tuple(codes.shape[:-1]) != tuple(scales.shape[:-1]):
            raise ValueError(f"codes [..., C/d] and scales [..., C/G] disagree: "
                             f"{tuple(codes.shape)} vs {tuple(scales.shape)}")
        n_channels = int(codes.shape[-1]) * self.dim
        self._check_channels(n_channels)
        n_groups = n_channels // self.group_size
        if scales.shape[-1] != n_groups:
            raise ValueError(f"{n_channels} channels need {n_groups} scales per row, got "
                             f"{scales.shape[-1]}")
        batch = tuple(codes.shape[:-1])
        grid, _, _ = self._grid_on(codes.device)
        points = grid[codes.reshape(-1).long()].reshape(-1, n_groups, self.group_size)
        s = scales.reshape(-1, n_groups, 1).to(torch.float32)
        x_hat = fwht(points * s) / self.group_size  # H symmetric: Hᵀ v == fwht(v)
        return x_hat.reshape(*batch, n_channels)

    def quantize(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``decode(*encode(x))``: the quantized reconstruction of ``x: [..., C]``, float32."""
        return self.decode(*self.encode(x))


# ----------------------------------------------------------------------------- packing

def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 31:
        raise ValueError(f"bits must be an integer in [1, 31], got {bits!r}")


def pack_codes(codes: np.ndarray | torch.Tensor, bits: int) -> np.ndarray:
    """Pack ``codes: [..., m]`` (integers in ``[0, 2^bits)``) to ``uint8 [..., ceil(m·bits/8)]``.

    Little-endian bitstream per row, layout in the module docstring.
    """
    _check_bits(bits)
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes)
    if codes.ndim < 1 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be an integer array [..., m], got {codes.dtype} "
                         f"{codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits} bits, got "
                         f"[{codes.min()}, {codes.max()}]")
    m = codes.shape[-1]
    shifts = np.arange(bits, dtype=np.int64)
    stream = ((codes.astype(np.int64)[..., None] >> shifts) & 1).astype(np.uint8)
    stream = stream.reshape(*codes.shape[:-1], m * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_codes(packed: np.ndarray | torch.Tensor, bits: int, m: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``uint8 [..., ceil(m·bits/8)]`` -> ``int32 [..., m]``."""
    _check_bits(bits)
    if isinstance(packed, torch.Tensor):
        packed = packed.detach().cpu().numpy()
    packed = np.asarray(packed)
    n_bytes = (m * bits + 7) // 8
    if packed.dtype != np.uint8 or packed.ndim < 1 or packed.shape[-1] != n_bytes:
        raise ValueError(f"{m} codes of {bits} bits need uint8 [..., {n_bytes}], got "
                         f"{packed.dtype} {packed.shape}")
    stream = np.unpackbits(packed, axis=-1, count=m * bits, bitorder="little")
    stream = stream.reshape(*packed.shape[:-1], m, bits).astype(np.int32)
    return (stream << np.arange(bits, dtype=np.int32)).sum(axis=-1, dtype=np.int32)


# ----------------------------------------------------------------------------- oracle

class ReferenceQuantization(NamedTuple):
    """Output of :func:`quantize_reference_slow` for one vector ``x: [C]``."""

    codes: np.ndarray  # int64 [C // d]
    scales: np.ndarray  # float16 [C // G]
    x_hat: np.ndarray  # float64 [C]
    y: np.ndarray  # float64 [C]: the rotated, normalised vector that was coded


def quantize_reference_slow(x: np.ndarray, grid: np.ndarray | torch.Tensor,
                            group_size: int) -> ReferenceQuantization:
    """Direct, deliberately naive implementation of the semantics, for tests only.

    ``x: [C]``. Explicit Hadamard matrix, float64 arithmetic, a Python loop over groups and
    pairs, nearest grid point by ``argmin ‖y − g‖²`` (first minimum on ties).
    """
    g = _as_grid_array(grid).astype(np.float64)
    d = g.shape[1]
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.shape[0] % group_size != 0 or group_size % d != 0:
        raise ValueError(f"need x: [C] with C a multiple of group_size={group_size} (itself a "
                         f"multiple of {d}), got {x.shape}")
    h = hadamard_matrix(group_size)
    codes, scales, x_hat, ys = [], [], [], []
    for start in range(0, x.shape[0], group_size):
        xg = x[start:start + group_size]
        s16 = np.float16(math.sqrt(float(np.sum(xg * xg))))
        s = float(s16)
        y = h @ xg / s if s != 0.0 else np.zeros(group_size)
        group_codes = []
        for j in range(0, group_size, d):
            dist2 = np.sum((y[j:j + d][None, :] - g) ** 2, axis=1)
            group_codes.append(int(np.argmin(dist2)))
        points = g[group_codes].reshape(group_size)
        x_hat.append(h.T @ (s * points) / group_size)
        codes.extend(group_codes)
        scales.append(s16)
        ys.append(y)
    return ReferenceQuantization(np.array(codes, dtype=np.int64),
                                 np.array(scales, dtype=np.float16),
                                 np.concatenate(x_hat), np.concatenate(ys))
