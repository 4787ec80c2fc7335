"""HIGGS quantizer: fast Walsh–Hadamard transform, Gaussian-optimal grids, encode/decode and
bit packing, exactly as DESIGN.md §3 defines them (the oracle for the native code)."""

from .grids import gaussian_grid, grid_mse
from .hadamard import fwht, hadamard_matrix
from .higgs import (HiggsQuantizer, bits_per_code, choose_group_size, pack_codes,
                    unpack_codes)

__all__ = [
    "fwht",
    "hadamard_matrix",
    "gaussian_grid",
    "grid_mse",
    "choose_group_size",
    "bits_per_code",
    "HiggsQuantizer",
    "pack_codes",
    "unpack_codes",
]
