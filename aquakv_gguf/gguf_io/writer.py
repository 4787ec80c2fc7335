"""Write ``model.aqua.gguf``: the input GGUF copied byte for byte plus the ``aquakv.*`` data.

Every key/value pair and tensor-info record of the input is emitted from its original bytes and
the tensor data section is streamed unchanged (rawgguf.rewrite); the AQUA-KV pairs and tensors
are appended after them.  The file is written to a temporary name in the destination folder and
renamed at the end, so a failure never leaves a partial ``model.aqua.gguf`` behind.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType

from . import names
from .errors import AquaKVFormatError
from .params import AquaKVParams, LayerPredictor, LowRankFactors, check_predictor_form, check_value_input, off_block_max
from .rawgguf import RawGGUF, rewrite

log = logging.getLogger(__name__)


def _calibration_value(value: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """GGUF type of one ``aquakv.calibration.*`` value (ints as u64/i64, floats as f32)."""
    if isinstance(value, bool):
        return value, GGUFValueType.BOOL, None
    if isinstance(value, (int, np.integer)):
        return int(value), GGUFValueType.UINT64 if value >= 0 else GGUFValueType.INT64, None
    if isinstance(value, (float, np.floating)):
        return float(value), GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return value, GGUFValueType.STRING, None
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(np.asarray(value).tolist()) if isinstance(value, np.ndarray) else list(value)
        if not items:
            raise ValueError("empty calibration arrays cannot be stored in GGUF")
        if all(isinstance(v, str) for v in items):
            return items, GGUFValueType.ARRAY, GGUFValueType.STRING
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
            return [int(v) for v in items], GGUFValueType.ARRAY, GGUFValueType.INT64
        return [float(v) for v in items], GGUFValueType.ARRAY, GGUFValueType.FLOAT32
    raise TypeError(f"unsupported calibration metadata value {value!r}")


def _layer_tensors(params: AquaKVParams, layer: int, pred: LayerPredictor,
                   weight_dtype: np.dtype = np.float16) -> dict[str, np.ndarray]:
    """``{tensor name: array}`` of one layer l >= 1 as stored: weights in ``weight_dtype``, biases f32.

    Dense: the three weights and two biases; low rank: the five factors and the two biases
    (the dense products of a low-rank layer are not stored).
    """
    arrays = pred.arrays()  # the dense fields and, when low-rank, the factors' fields
    templates = names.layer_tensor_templates(params.predictor_form)
    return {template.format(layer=layer): np.ascontiguousarray(
                arrays[f], dtype=np.float32 if f in names.BIAS_FIELDS else weight_dtype)
            for f, template in templates.items()}


def aquakv_tensors(params: AquaKVParams, weight_dtype: np.dtype = np.float16) -> dict[str, np.ndarray]:
    """The AQUA-KV tensors as numpy arrays in writing order (numpy shape = reversed GGUF ne).

    grid/grid0: ``[n_points, dim]`` f32; per layer N >= 1 weights ``[C_out, C_in]`` (dense) or
    factors (``[R, C]`` / ``[C, R]``, low rank) in ``weight_dtype`` and biases ``[C]`` f32.
    """
    out: dict[str, np.ndarray] = {
        names.TENSOR_GRID: np.ascontiguousarray(params.grid, dtype=np.float32),
        names.TENSOR_GRID0: np.ascontiguousarray(params.grid0, dtype=np.float32),
    }
    for layer, pred in enumerate(params.predictors):
        if pred is not None:
            out.update(_layer_tensors(params, layer, pred, weight_dtype))
    return out


def aquakv_metadata(params: AquaKVParams) -> list[tuple[str, Any, GGUFValueType, GGUFValueType | None]]:
    """``(key, value, type, sub_type)`` of every ``aquakv.*`` key, in writing order."""
    u32 = GGUFValueType.UINT32
    rows: list[tuple[str, Any, GGUFValueType, GGUFValueType | None]] = [
        (names.KEY_VERSION, names.FORMAT_VERSION, u32, None),
        (names.KEY_GRID_DIM, int(params.grid.shape[1]), u32, None),
        (names.KEY_GRID_SIZE, int(params.grid.shape[0]), u32, None),
        (names.KEY_GRID0_SIZE, int(params.grid0.shape[0]), u32, None),
        (names.KEY_GROUP_SIZE, int(params.group_size), u32, None),
        (names.KEY_PREFIX_TOKENS, int(params.prefix_tokens), u32, None),
        (names.KEY_RECENT_TOKENS, int(params.recent_tokens), u32, None),
        # always written (readers treat its absence as "dense", for files from before it existed)
        (names.KEY_PREDICTOR_FORM, params.predictor_form, GGUFValueType.STRING, None),
    ]
    if params.predictor_form == names.FORM_LOWRANK:
        rows.append((names.KEY_PREDICTOR_RANK_K, int(params.predictor_rank_k), u32, None))
        rows.append((names.KEY_PREDICTOR_RANK_V, int(params.predictor_rank_v), u32, None))
    if params.predictor_value_input != names.VALUE_INPUT_V_PREV:
        # written only when it differs from the paper's chain, so a v_prev file is byte-identical to
        # one written before the key existed
        rows.append((names.KEY_PREDICTOR_VALUE_INPUT, params.predictor_value_input, GGUFValueType.STRING, None))
    if params.predictor_block_size:
        rows.append((names.KEY_PREDICTOR_BLOCK, int(params.predictor_block_size), u32, None))
    for key, value in params.calibration.items():
        rows.append((names.CALIBRATION_PREFIX + key, *_calibration_value(value)))
    return rows


def check_params(params: AquaKVParams) -> None:
    if params.channel_order != "llama.cpp":
        raise ValueError("write_aqua_gguf needs predictors in llama.cpp channel order "
                         "(use params.with_channel_order('llama.cpp', permutes_qk=...))")
    c = params.n_channels
    block = params.block_size
    if block <= 0 or c % block:
        raise ValueError(f"predictor_block_size {params.predictor_block_size} must divide C = {c}")
    check_predictor_form(params.predictor_form, params.predictor_rank_k, params.predictor_rank_v, c,
                         params.predictor_block_size)
    check_value_input(params.predictor_value_input)
    lowrank = params.predictor_form == names.FORM_LOWRANK
    factor_shapes = LowRankFactors.shapes(c, params.predictor_rank_k, params.predictor_rank_v)
    if len(params.predictors) != params.n_layers or params.predictors[0] is not None:
        raise ValueError(f"need {params.n_layers} predictor slots with None at layer 0")
    for layer, pred in enumerate(params.predictors[1:], start=1):
        if pred is None:
            raise ValueError(f"layer {layer} has no predictor")
        if lowrank != (pred.factors is not None):
            raise ValueError(f"layer {layer}: predictor_form is {params.predictor_form!r} but the layer "
                             + ("has no low-rank factors" if lowrank else "carries low-rank factors"))
        for field, arr in pred.arrays().items():
            want = factor_shapes.get(field) or ((c, c) if field in names.WEIGHT_FIELDS else (c,))
            if arr.shape != want:
                raise ValueError(f"layer {layer} {field}: shape {arr.shape}, expected {want}")
            if field in names.WEIGHT_FIELDS and (off := off_block_max(arr, block)) > 0:
                raise ValueError(f"layer {layer} {field}: entry {off:g} outside the diagonal {block}x{block} "
                                 f"blocks of a block-diagonal predictor (predictor_block_size {block})")


def write_aqua_gguf(src: str | os.PathLike[str], dst: str | os.PathLike[str], params: AquaKVParams, *,
                    weight_dtype: np.dtype = np.float16, progress: bool = True) -> Path:
    """Copy GGUF ``src`` to ``dst`` adding the AQUA-KV metadata and tensors of ``params``.

    ``params`` must be in llama.cpp channel order.  ``dst`` is replaced atomically (temp file in
    the same folder + ``os.replace``); ``src`` is never modified and may not be ``dst``.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    check_params(params)
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise AquaKVFormatError(f"refusing to overwrite the input model {src}")
    raw = RawGGUF(src)
    if any(names.is_aquakv_key(k) for k in raw.fields) or any(names.is_aquakv_tensor(t.name) for t in raw.tensors):
        raise AquaKVFormatError(f"{src} already carries aquakv.* data: convert the original model instead")
    if "general.architecture" not in raw.fields:
        raise AquaKVFormatError(f"{src}: no general.architecture key")
    extra = aquakv_tensors(params, weight_dtype)
    rewrite(raw, dst, add_fields=aquakv_metadata(params), add_tensors=extra, progress=progress)
    log.info("wrote %s (%d original + %d aquakv tensors) in %.1f s", dst, len(raw.tensors), len(extra),
             time.perf_counter() - t0)
    return dst
