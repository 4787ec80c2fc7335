"""Helpers for tests: tiny random models with a real tokenizer and their GGUF conversion."""

from __future__ import annotations

from .aqua_params import random_aquakv_params
from .tiny_model import (
    ARCHITECTURES,
    build_tiny_hf_model,
    convert_hf_to_gguf,
    smollm2_tokenizer_dir,
)

__all__ = ["ARCHITECTURES", "build_tiny_hf_model", "convert_hf_to_gguf", "random_aquakv_params", "smollm2_tokenizer_dir"]
