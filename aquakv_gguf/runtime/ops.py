"""The native AQUA-KV ggml ops, run alone on the CPU backend (the oracle tests' entry point).

``encode_rows`` / ``decode_rows`` go through the very ggml ops and kernels the cache uses
(``native/ops-cpu``), so comparing them with :class:`aquakv_gguf.quant.HiggsQuantizer` checks the
native quantizer against the torch one. Row layout: packed codes (``quant.pack_codes``) followed
by the f16 group scales.
"""

from __future__ import annotations

import numpy as np

from aquakv_gguf.runtime._ffi import ffi, lib
from aquakv_gguf.runtime.errors import LlamaError
from aquakv_gguf.runtime.model import log_tail


def _grid_array(grid) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(grid, dtype=np.float32))
    if arr.ndim != 2:
        raise ValueError(f"grid must be [n_points, dim], got shape {arr.shape}")
    return arr


def row_bytes(n_channels: int, group_size: int, grid_dim: int, grid_size: int) -> int:
    """Bytes of one packed row (codes + f16 scales); ValueError for an invalid combination."""
    n = int(lib().aquakv_op_row_bytes(n_channels, group_size, grid_dim, grid_size))
    if n < 0:
        raise ValueError(f"no AQUA-KV row layout for C={n_channels}, group {group_size}, "
                         f"grid {grid_size} x {grid_dim}")
    return n


def encode_rows(x: np.ndarray, grid, group_size: int, *, n_threads: int = 2, gpu: bool = False) -> np.ndarray:
    """Encode ``x: float32 [n_rows, C]`` into packed rows ``uint8 [n_rows, row_bytes]`` (on the first GPU if ``gpu``)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    g = _grid_array(grid)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be [n_rows >= 1, C], got shape {x.shape}")
    rb = row_bytes(x.shape[1], group_size, g.shape[1], g.shape[0])
    out = np.empty((x.shape[0], rb), dtype=np.uint8)
    rc = lib().aquakv_op_encode(ffi.from_buffer("float[]", x), x.shape[0], x.shape[1],
                                ffi.from_buffer("float[]", g), g.shape[0], g.shape[1], group_size, n_threads, gpu,
                                ffi.from_buffer("uint8_t[]", out))
    if rc != 0:
        raise LlamaError("the native AQUA-KV encoder failed", log_tail())
    return out


def decode_rows(rows: np.ndarray, grid, n_channels: int, group_size: int, *, n_threads: int = 2,
                gpu: bool = False) -> np.ndarray:
    """Decode packed rows ``uint8 [n_rows, row_bytes]`` to ``float32 [n_rows, C]`` (on the first GPU if ``gpu``)."""
    rows = np.ascontiguousarray(np.asarray(rows, dtype=np.uint8))
    g = _grid_array(grid)
    rb = row_bytes(n_channels, group_size, g.shape[1], g.shape[0])
    if rows.ndim != 2 or rows.shape[1] != rb or rows.shape[0] == 0:
        raise ValueError(f"rows must be uint8 [n_rows >= 1, {rb}], got shape {rows.shape}")
    out = np.empty((rows.shape[0], n_channels), dtype=np.float32)
    rc = lib().aquakv_op_decode(ffi.from_buffer("uint8_t[]", rows), rows.shape[0], n_channels,
                                ffi.from_buffer("float[]", g), g.shape[0], g.shape[1], group_size, n_threads, gpu,
                                ffi.from_buffer("float[]", out))
    if rc != 0:
        raise LlamaError("the native AQUA-KV decoder failed", log_tail())
    return out


def split_rows(rows: np.ndarray, n_channels: int, group_size: int, bits: int, grid_dim: int = 2
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(codes int32 [n, C/d], scales float16 [n, C/G])`` from packed rows."""
    from aquakv_gguf.quant import unpack_codes
    m = n_channels // grid_dim
    code_bytes = (m * bits + 7) // 8
    codes = unpack_codes(np.ascontiguousarray(rows[:, :code_bytes]), bits, m)
    scales = np.ascontiguousarray(rows[:, code_bytes:]).view(np.float16)
    if scales.shape[1] != n_channels // group_size:
        raise ValueError("rows do not match the given channel count and group size")
    return codes, scales


def rope_f16(x: np.ndarray, positions: np.ndarray, *, neox: bool, freq_base: float = 10000.0, fused: bool = True,
             n_threads: int = 2, gpu: bool = False) -> np.ndarray:
    """RoPE then f16 of ``x: float32 [n_tokens, n_head, head_dim]`` at ``positions: int32 [n_tokens]``.

    ``fused``: the cache's ``ggml_aquakv_rope_f16`` with its rotation table built as the cache graph
    builds it; else upstream's ``ggml_rope_ext`` followed by ``ggml_cast``. Returns float16 of x's shape.
    """
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    pos = np.ascontiguousarray(np.asarray(positions, dtype=np.int32))
    if x.ndim != 3 or x.shape[0] == 0 or x.shape[2] % 2 != 0 or pos.shape != (x.shape[0],):
        raise ValueError(f"x must be [n_tokens >= 1, n_head, even head_dim] with one position per token, "
                         f"got {x.shape} and {pos.shape}")
    out = np.empty(x.shape, dtype=np.float16)
    rc = lib().aquakv_op_rope_f16(ffi.from_buffer("float[]", x), ffi.from_buffer("int32_t[]", pos), x.shape[0],
                                  x.shape[2], x.shape[1], int(neox), freq_base, n_threads, gpu, fused,
                                  ffi.from_buffer("uint16_t[]", out))
    if rc != 0:
        raise LlamaError("the native AQUA-KV RoPE op failed", log_tail())
    return out


def cast_f16(x: np.ndarray, *, n_threads: int = 2, gpu: bool = False) -> np.ndarray:
    """``x: float32 [n_rows, C]`` to float16 by the cache's value cast (``ggml_aquakv_rope_f16`` without rotation)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be [n_rows >= 1, C], got shape {x.shape}")
    out = np.empty(x.shape, dtype=np.float16)
    rc = lib().aquakv_op_cast_f16(ffi.from_buffer("float[]", x), x.shape[0], x.shape[1], n_threads, gpu,
                                  ffi.from_buffer("uint16_t[]", out))
    if rc != 0:
        raise LlamaError("the native AQUA-KV cast op failed", log_tail())
    return out
