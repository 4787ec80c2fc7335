"""Keep glibc's malloc from returning large tensor buffers to the kernel between ops.

Calibration allocates and frees the same few large tensors (a ``[4, 512, 1536]`` MLP activation
is 12 MiB) thousands of times per layer.  By default glibc serves blocks of that size with
``mmap`` (or trims them off the top of the heap when freed), so every allocation comes back as
fresh pages the kernel has to fault in and zero: on two cores that was ~12% of a SmolLM2 layer's
forward (11.8k vs 10.5k token-layers/s, same machine, interleaved runs).  Raising the mmap and
trim thresholds keeps freed blocks in the heap for reuse; the cost is that the process keeps its
peak heap until it exits, which a one-shot conversion does not mind.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap
TRIM_THRESHOLD = (1 << 31) - 1  # never trim the heap top (mallopt takes an int)
TOP_PAD = 64 << 20  # grow the heap 64 MiB at a time

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set the thresholds once per process; True when glibc accepted them (False elsewhere)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                             (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    _applied = ok
    log.debug("glibc malloc thresholds %s", "raised" if ok else "not accepted")
    return ok
