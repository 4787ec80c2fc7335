"""Test-run settings for offloading: the same tests run on CPU and, on a GPU machine, fully offloaded."""

from __future__ import annotations

import os


def test_n_gpu_layers() -> int:
    """Layers to offload in tests: ``AQUAKV_TEST_N_GPU_LAYERS`` (0 on CPU-only machines)."""
    return int(os.environ.get("AQUAKV_TEST_N_GPU_LAYERS", "0"))


test_n_gpu_layers.__test__ = False  # not a pytest test despite its name
