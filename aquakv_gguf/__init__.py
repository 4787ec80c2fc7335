"""aquakv-gguf: AQUA-KV key/value-cache compression for llama.cpp.

Calibrate and convert models (``python -m aquakv_gguf.convert``), a patched llama.cpp
built into this package, and cffi bindings to drive it (``aquakv_gguf.runtime``).
"""

__version__ = "0.1.0"
