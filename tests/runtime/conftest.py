"""Fixtures for tests that run the patched llama.cpp through the bindings."""

from __future__ import annotations

import pytest

from aquakv_gguf.runtime import Model

from aquakv_gguf.testing.gpu import test_n_gpu_layers

NGL = test_n_gpu_layers()


@pytest.fixture(scope="session")
def smollm2_model(smollm2_path):
    with Model(smollm2_path, n_gpu_layers=NGL) as model:
        yield model


@pytest.fixture(scope="session")
def tiny_model(tiny_llama_gguf):
    with Model(tiny_llama_gguf, n_gpu_layers=NGL) as model:
        yield model
