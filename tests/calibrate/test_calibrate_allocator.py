"""glibc malloc thresholds for calibration: applied once, and freed tensor memory is reused."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from aquakv_gguf.calibrate import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_thresholds_are_accepted_once() -> None:
    first = allocator.keep_freed_memory()
    assert first is GLIBC
    assert allocator.keep_freed_memory() is first  # idempotent: mallopt is not called again


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds are a glibc feature")
def test_freed_tensors_are_not_returned_to_the_kernel() -> None:
    # In a fresh process: a 64 MiB tensor freed and allocated again reuses the same pages, so
    # repeated allocations cause (almost) no new page faults; without the thresholds glibc unmaps
    # it every time.  (One re-fault is tolerated: the heap may still move once after warm-up.)
    code = r"""
import resource, sys, torch
from aquakv_gguf.calibrate.allocator import keep_freed_memory
if sys.argv[1] == "1":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    torch.ones(16 << 20)
before = faults()
for _ in range(5):
    torch.ones(16 << 20)
print(faults() - before)
"""
    runs = {flag: int(subprocess.run([sys.executable, "-c", code, flag], check=True, capture_output=True,
                                     text=True).stdout.split()[-1]) for flag in ("0", "1")}
    pages = (64 << 20) // 4096
    assert runs["0"] > 3 * pages, runs  # baseline: every allocation faults its pages in again
    assert runs["1"] < 1.5 * pages, runs
