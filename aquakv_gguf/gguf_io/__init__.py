"""Write/read the AQUA-KV part of a GGUF (DESIGN §4).

Public API:
- ``AquaKVParams``, ``LayerPredictor``: the parameters (numpy, ``p = W @ x + b`` orientation);
  ``LowRankFactors``: a layer's factors for ``predictor_form == "lowrank"``;
  ``check_predictor_form(form, rank_k, rank_v, n_channels, block_size)``.
- ``llama_cpp_key_permutation(n_kv_heads, head_dim) -> perm`` with ``k_llama_cpp = k_hf[perm]``.
- ``write_aqua_gguf(src, dst, params)``: byte-identical copy of ``src`` plus aquakv.* data.
- ``read_aqua_gguf(path) -> AquaKVParams`` / ``validate_aqua_gguf``: validated read-back.
- ``read_model_dims(raw) -> ModelDims``, ``open_gguf(path) -> RawGGUF`` (fast header parser),
  ``rewrite(raw, dst, add_fields=..., add_tensors=...)``, ``pack_field(name, value, vtype)``.
- ``AquaKVFormatError``.
"""

from .errors import AquaKVFormatError
from .names import FORMAT_VERSION
from .params import (
    AquaKVParams,
    LayerPredictor,
    LowRankFactors,
    check_predictor_form,
    check_value_input,
    llama_cpp_key_permutation,
    permute_predictor,
)
from .rawgguf import RawGGUF, pack_field, rewrite
from .reader import ModelDims, has_aquakv, open_gguf, read_aqua_gguf, read_model_dims, validate_aqua_gguf
from .writer import aquakv_metadata, aquakv_tensors, write_aqua_gguf

__all__ = [
    "FORMAT_VERSION",
    "AquaKVFormatError",
    "AquaKVParams",
    "LayerPredictor",
    "LowRankFactors",
    "ModelDims",
    "RawGGUF",
    "aquakv_metadata",
    "aquakv_tensors",
    "check_predictor_form",
    "check_value_input",
    "has_aquakv",
    "llama_cpp_key_permutation",
    "open_gguf",
    "pack_field",
    "permute_predictor",
    "read_aqua_gguf",
    "read_model_dims",
    "rewrite",
    "validate_aqua_gguf",
    "write_aqua_gguf",
]
