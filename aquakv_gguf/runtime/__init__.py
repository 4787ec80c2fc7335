"""cffi bindings to the patched libllama built into this package.

>>> from aquakv_gguf.runtime import Model
>>> with Model("model.gguf") as model, model.context(n_ctx=2048) as ctx:
...     for step in ctx.generate("Once upon a time", max_tokens=32):
...         print(step.text, end="", flush=True)
"""

from aquakv_gguf.runtime.context import Context, GenerationStep, cache_type_id
from aquakv_gguf.runtime.errors import ContextFullError, LlamaError
from aquakv_gguf.runtime.model import Model, log_tail
from aquakv_gguf.runtime.sampling import Sampler, SamplingParams


def build_info() -> str:
    """Identification of the patched library, e.g. 'aquakv-gguf 0.1.0 (llama.cpp 0c1e57098)'."""
    from aquakv_gguf.runtime._ffi import ffi, lib
    return ffi.string(lib().llama_aquakv_build_info()).decode()


def supports_gpu_offload() -> bool:
    from aquakv_gguf.runtime._ffi import lib
    return bool(lib().llama_supports_gpu_offload())


__all__ = ["Context", "ContextFullError", "GenerationStep", "LlamaError", "Model", "Sampler",
           "SamplingParams", "build_info", "cache_type_id", "log_tail", "supports_gpu_offload"]
