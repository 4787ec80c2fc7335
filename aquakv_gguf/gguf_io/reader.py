"""Read and validate the ``aquakv.*`` part of a ``model.aqua.gguf``.

``read_model_dims`` reads the model shape the cache depends on from the standard llama.cpp
keys; ``read_aqua_gguf`` returns the AQUA-KV parameters (llama.cpp channel order, as stored)
after checking every tensor against the metadata and the model's dimensions.  Every failure
is an ``AquaKVFormatError`` with a one-line message naming the file and the problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import names
from .errors import AquaKVFormatError
from .params import AquaKVParams, LayerPredictor, LowRankFactors, check_predictor_form, off_block_max
from .rawgguf import RawGGUF


@dataclass(frozen=True)
class ModelDims:
    """Attention shape of a GGUF model: C = n_kv_heads * head_dim key/value channels per layer."""

    arch: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    sliding_window: int

    @property
    def n_channels(self) -> int:
        return self.n_kv_heads * self.head_dim


def open_gguf(path: str | os.PathLike[str]) -> RawGGUF:
    """Parsed GGUF header; corrupt or truncated files raise AquaKVFormatError."""
    return RawGGUF(path)


def _field(raw: RawGGUF, key: str, default: Any = None, required: bool = True) -> Any:
    if key not in raw.fields:
        if required:
            raise AquaKVFormatError(f"{raw.path}: missing metadata key {key}")
        return default
    return raw.fields[key].value


def _uniform_int(value: Any, key: str, path: Path) -> int:
    """Per-layer arrays (some archs store head counts per layer) must be uniform for AQUA-KV."""
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise AquaKVFormatError(f"{path}: {key} varies across layers ({sorted(set(value))}); unsupported")
        value = value[0]
    try:
        return int(value)
    except (TypeError, ValueError):
        raise AquaKVFormatError(f"{path}: {key} is not an integer ({value!r})") from None


def read_model_dims(raw: RawGGUF, path: str | os.PathLike[str] | None = None) -> ModelDims:
    """Model dimensions from ``{arch}.*`` keys, cross-checked with ``blk.0.attn_k.weight``."""
    path = Path(path or raw.path)
    arch = _field(raw, "general.architecture")
    if not isinstance(arch, str):
        raise AquaKVFormatError(f"{path}: general.architecture is not a string")
    n_layers = _uniform_int(_field(raw, f"{arch}.block_count"), "block_count", path)
    n_embd = _uniform_int(_field(raw, f"{arch}.embedding_length"), "embedding_length", path)
    n_heads = _uniform_int(_field(raw, f"{arch}.attention.head_count"), "head_count", path)
    n_kv = _uniform_int(_field(raw, f"{arch}.attention.head_count_kv", default=n_heads, required=False),
                        "head_count_kv", path)
    if n_heads <= 0 or n_kv <= 0 or n_layers <= 0:
        raise AquaKVFormatError(f"{path}: non-positive block_count/head_count/head_count_kv")
    head_dim = _uniform_int(_field(raw, f"{arch}.attention.key_length", default=n_embd // n_heads, required=False),
                            "key_length", path)
    v_dim = _uniform_int(_field(raw, f"{arch}.attention.value_length", default=head_dim, required=False),
                         "value_length", path)
    if v_dim != head_dim:
        raise AquaKVFormatError(f"{path}: key_length {head_dim} != value_length {v_dim}; unsupported")
    swa = _field(raw, f"{arch}.attention.sliding_window", default=0, required=False)
    swa = int(max(swa) if isinstance(swa, list) else swa)
    k0 = raw.tensor("blk.0.attn_k.weight")
    if k0 is not None:
        want = n_kv * head_dim
        # GGUF lists ne0 (input features) first; ne1 is the number of key channels.
        if len(k0.ne) != 2 or k0.ne[1] != want:
            raise AquaKVFormatError(
                f"{path}: blk.0.attn_k.weight has GGUF shape {list(k0.ne)} but the metadata says "
                f"{n_kv} KV heads x {head_dim} = {want} key channels")
    return ModelDims(arch, n_layers, n_heads, n_kv, head_dim, swa)


def has_aquakv(path: str | os.PathLike[str]) -> bool:
    """Whether a GGUF carries any aquakv.* metadata."""
    return any(names.is_aquakv_key(k) for k in RawGGUF(path).fields)


def read_aqua_gguf(path: str | os.PathLike[str]) -> AquaKVParams:
    """Validated AQUA-KV parameters of ``path`` (channel_order "llama.cpp", weights as stored).

    Checks: readable and untruncated file; aquakv.version supported; grids ``[size, dim]`` f32
    matching aquakv.grid.size/grid0.size/grid.dim; group size a power of two dividing C; every
    layer 1..n_layer-1 has all five predictor tensors with shapes ``[C, C]``/``[C]`` (C =
    head_count_kv * key_length), f16/f32 weights and f32 biases, finite; no AQUA-KV tensors
    for layer 0 or beyond the model's layers.  aquakv.predictor.form "lowrank" (absent: dense)
    instead needs the ranks (1..C) and the five factors (``[R, C]``/``[C, R]``) plus the two
    biases per layer, no dense weights and no block size; its layers' dense fields are the
    products U·D of the stored factors (``LayerPredictor.from_factors``).
    aquakv.predictor.value_input (absent: "v_prev") must be one of ``names.VALUE_INPUTS``.
    """
    path = Path(path)
    raw = RawGGUF(path)
    if names.KEY_VERSION not in raw.fields:
        raise AquaKVFormatError(f"{path}: no aquakv.* metadata (not converted with python -m aquakv_gguf.convert)")
    version = _uniform_int(_field(raw, names.KEY_VERSION), names.KEY_VERSION, path)
    if version != names.FORMAT_VERSION:
        raise AquaKVFormatError(f"{path}: aquakv.version {version} is not supported (expected {names.FORMAT_VERSION})")
    dims = read_model_dims(raw, path)
    c = dims.n_channels
    meta = {k: _uniform_int(_field(raw, k), k, path) for k in (
        names.KEY_GRID_DIM, names.KEY_GRID_SIZE, names.KEY_GRID0_SIZE, names.KEY_GROUP_SIZE,
        names.KEY_PREFIX_TOKENS, names.KEY_RECENT_TOKENS)}
    group = meta[names.KEY_GROUP_SIZE]
    if group <= 1 or group & (group - 1) or c % group:
        raise AquaKVFormatError(f"{path}: aquakv.group_size {group} must be a power of two dividing C = {c}")
    if meta[names.KEY_RECENT_TOKENS] <= 0:
        raise AquaKVFormatError(f"{path}: aquakv.recent_tokens must be positive")
    dim = meta[names.KEY_GRID_DIM]
    if dim <= 0 or c % dim:
        raise AquaKVFormatError(f"{path}: aquakv.grid.dim {dim} does not divide C = {c}")
    block = _uniform_int(_field(raw, names.KEY_PREDICTOR_BLOCK, 0, required=False), names.KEY_PREDICTOR_BLOCK, path)
    if block and (block < 0 or c % block):
        raise AquaKVFormatError(f"{path}: {names.KEY_PREDICTOR_BLOCK} {block} must divide C = {c}")
    form, rank_k, rank_v = _predictor_form(raw, path, c)
    value_input = _field(raw, names.KEY_PREDICTOR_VALUE_INPUT, names.VALUE_INPUT_V_PREV, required=False)
    if value_input not in names.VALUE_INPUTS:
        raise AquaKVFormatError(f"{path}: unknown {names.KEY_PREDICTOR_VALUE_INPUT} {value_input!r} "
                                f"(this reader knows {', '.join(names.VALUE_INPUTS)})")
    lowrank = form == names.FORM_LOWRANK
    tensors = {t.name: t for t in raw.tensors}

    def get(name: str, shape: tuple[int, ...], allow_f16: bool) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise AquaKVFormatError(f"{path}: missing tensor {name}")
        try:
            arr = raw.tensor_array(t)
        except TypeError:
            raise AquaKVFormatError(f"{path}: tensor {name} has type {t.ggml_type.name}, expected F32"
                                    + ("/F16" if allow_f16 else "")) from None
        if arr.dtype == np.float16 and not allow_f16:
            raise AquaKVFormatError(f"{path}: tensor {name} must be F32")
        if arr.shape != shape:
            raise AquaKVFormatError(f"{path}: tensor {name} has shape {list(arr.shape)} "
                                    f"(GGUF ne {list(t.ne)}), expected {list(shape)}")
        if not np.all(np.isfinite(arr)):
            raise AquaKVFormatError(f"{path}: tensor {name} has non-finite values")
        return arr

    grid = get(names.TENSOR_GRID, (meta[names.KEY_GRID_SIZE], dim), False)
    grid0 = get(names.TENSOR_GRID0, (meta[names.KEY_GRID0_SIZE], dim), False)
    predictors: list[LayerPredictor | None] = [None]
    factor_shapes = LowRankFactors.shapes(c, rank_k, rank_v)
    layer_templates = names.layer_tensor_templates(form)
    for layer in range(1, dims.n_layers):
        arrays = {}
        for field, template in layer_templates.items():
            shape = factor_shapes.get(field) or ((c, c) if field in names.WEIGHT_FIELDS else (c,))
            is_weight = field not in names.BIAS_FIELDS
            arrays[field] = get(template.format(layer=layer), shape, is_weight)
            if field in names.WEIGHT_FIELDS and block and (off := off_block_max(arrays[field], block)) > 0:
                raise AquaKVFormatError(f"{path}: tensor {template.format(layer=layer)} has entry {off:g} outside "
                                        f"its diagonal {block}x{block} blocks ({names.KEY_PREDICTOR_BLOCK} = {block})")
        if lowrank:
            factors = LowRankFactors(**{f: arrays[f] for f in names.LOWRANK_TENSORS})
            predictors.append(LayerPredictor.from_factors(factors, arrays["k_bias"], arrays["v_bias"]))
        else:
            predictors.append(LayerPredictor(**arrays))
    expected = {names.TENSOR_GRID, names.TENSOR_GRID0} | {
        template.format(layer=layer) for layer in range(1, dims.n_layers) for template in layer_templates.values()}
    unexpected = sorted(n for n in tensors if names.is_aquakv_tensor(n) and n not in expected)
    if unexpected:
        raise AquaKVFormatError(f"{path}: unexpected AQUA-KV tensors for this model ({', '.join(unexpected[:3])}"
                                f"{', ...' if len(unexpected) > 3 else ''}): n_layer is {dims.n_layers}, "
                                f"predictor form {form}")
    calibration = {k[len(names.CALIBRATION_PREFIX):]: f.value for k, f in raw.fields.items()
                   if k.startswith(names.CALIBRATION_PREFIX)}
    return AquaKVParams(
        grid=grid, grid0=grid0, group_size=group,
        prefix_tokens=meta[names.KEY_PREFIX_TOKENS], recent_tokens=meta[names.KEY_RECENT_TOKENS],
        n_layers=dims.n_layers, n_kv_heads=dims.n_kv_heads, head_dim=dims.head_dim,
        predictors=predictors, channel_order="llama.cpp", calibration=calibration,
        predictor_block_size=0 if block == c else block, predictor_form=form, predictor_rank_k=rank_k,
        predictor_rank_v=rank_v, predictor_value_input=value_input)


def _predictor_form(raw: RawGGUF, path: Path, c: int) -> tuple[str, int, int]:
    """``(form, rank_k, rank_v)`` from the aquakv.predictor.* keys (ranks 0 when dense).

    An absent form key is "dense" (files written before the key existed).  The ranks are
    required with "lowrank" and refused with "dense"; "lowrank" also refuses a block-size key.
    """
    form = _field(raw, names.KEY_PREDICTOR_FORM, names.FORM_DENSE, required=False)
    if not isinstance(form, str):
        raise AquaKVFormatError(f"{path}: {names.KEY_PREDICTOR_FORM} is not a string ({form!r})")
    if form not in names.PREDICTOR_FORMS:
        raise AquaKVFormatError(f"{path}: unknown {names.KEY_PREDICTOR_FORM} {form!r} "
                                f"(this reader knows {', '.join(names.PREDICTOR_FORMS)})")
    rank_keys = (names.KEY_PREDICTOR_RANK_K, names.KEY_PREDICTOR_RANK_V)
    if form != names.FORM_LOWRANK:
        if present := [k for k in rank_keys if k in raw.fields]:
            raise AquaKVFormatError(f"{path}: {present[0]} is set but {names.KEY_PREDICTOR_FORM} is {form!r}")
        return form, 0, 0
    if names.KEY_PREDICTOR_BLOCK in raw.fields:
        raise AquaKVFormatError(f"{path}: {names.KEY_PREDICTOR_BLOCK} and {names.KEY_PREDICTOR_FORM} 'lowrank' "
                                "cannot be combined (low-rank predictors are not block-diagonal)")
    rank_k, rank_v = (_uniform_int(_field(raw, k), k, path) for k in rank_keys)
    try:
        check_predictor_form(form, rank_k, rank_v, c)
    except ValueError as exc:
        raise AquaKVFormatError(f"{path}: {exc}") from None
    return form, rank_k, rank_v


def validate_aqua_gguf(path: str | os.PathLike[str]) -> AquaKVParams:
    """Alias of read_aqua_gguf for callers that only want the checks."""
    return read_aqua_gguf(path)
