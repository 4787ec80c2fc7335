"""Torch reference of AQUA-KV (DESIGN §3): the cache for transformers models and its arithmetic.

Public API:
- ``AquaKVCache(model, *, mode="aqua"|"higgs"|"f16"|"off", params=None, bits=None, layer0_bits=None,
  group_size=None, prefix_tokens=4, recent_tokens=128, recipe=None)``: a transformers ``Cache``.
- ``quantized_end(n_tokens, prefix_tokens, recent_tokens)``: the token policy.
- ``predict_keys``, ``predict_values`` (dense), ``predict_keys_lowrank``, ``predict_values_lowrank``
  (low rank, in the format's order), ``residual_quantize``, ``apply_rope``: shared arithmetic.
- ``kv_bits``, ``bits_per_value``, ``quantized_vector_bits``: storage accounting.
"""

from .accounting import bits_per_value, kv_bits, quantized_vector_bits
from .semantics import (
    apply_rope,
    predict_keys,
    predict_keys_lowrank,
    predict_values,
    predict_values_lowrank,
    quantized_end,
    residual_quantize,
    rotate_half,
)


def __getattr__(name: str):
    # The cache pulls in transformers; import it lazily so the arithmetic stays cheap to import.
    if name in ("AquaKVCache", "AquaKVLayer", "KeyTap", "MODES"):
        from . import cache

        return getattr(cache, name)
    raise AttributeError(name)


__all__ = [
    "MODES",
    "AquaKVCache",
    "AquaKVLayer",
    "KeyTap",
    "apply_rope",
    "bits_per_value",
    "kv_bits",
    "predict_keys",
    "predict_keys_lowrank",
    "predict_values",
    "predict_values_lowrank",
    "quantized_end",
    "quantized_vector_bits",
    "residual_quantize",
    "rotate_half",
]
