"""The bindings load the patched library and, on a GPU build, offload every layer when asked."""

from __future__ import annotations

import re

from aquakv_gguf.runtime import Model, build_info, log_tail, supports_gpu_offload
from aquakv_gguf.testing.gpu import test_n_gpu_layers

NGL = test_n_gpu_layers()


def test_library_is_the_patched_build():
    info = build_info()
    assert re.fullmatch(r"aquakv-gguf \S+ \(llama\.cpp 0c1e57098\)", info), info


def test_layers_are_placed_as_requested(tiny_llama_gguf):
    with Model(tiny_llama_gguf, n_gpu_layers=NGL) as model:
        log = log_tail()
        assert build_info() in log  # the hook logs the patch at every model load
        if NGL > 0:
            assert supports_gpu_offload()
            total = model.n_layer + 1  # repeating layers + output layer
            assert f"offloaded {total}/{total} layers to GPU" in log, log[-2000:]
        else:
            assert not re.search(r"offloaded [1-9]\d*/\d+ layers to GPU", log)
