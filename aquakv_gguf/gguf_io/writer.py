"""Write ``model.aqua.gguf``: the input GGUF copied byte for byte plus the ``aquakv.*`` data.

Every key/value pair of the input is re-emitted with its original type (values round-trip
exactly: integers, f32/f64 bit patterns, strings and arrays), and every tensor's info and
raw data bytes are copied unchanged, in the input's order, followed by the AQUA-KV tensors.
The file is written to a temporary name in the destination folder and renamed at the end,
so a failure never leaves a partial ``model.aqua.gguf`` behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from tqdm import tqdm

from . import names
from .errors import AquaKVFormatError
from .params import AquaKVParams

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


def aquakv_tensors(params: AquaKVParams, weight_dtype: np.dtype = np.float16) -> dict[str, np.ndarray]:
    """The AQUA-KV tensors as numpy arrays in writing order (numpy shape = reversed GGUF ne).

    grid/grid0: ``[n_points, dim]`` f32; per layer N >= 1 weights ``[C_out, C_in]`` in
    ``weight_dtype`` and biases ``[C]`` f32.
    """
    out: dict[str, np.ndarray] = {
        names.TENSOR_GRID: np.ascontiguousarray(params.grid, dtype=np.float32),
        names.TENSOR_GRID0: np.ascontiguousarray(params.grid0, dtype=np.float32),
    }
    for layer, pred in enumerate(params.predictors):
        if pred is None:
            continue
        for field, template in names.LAYER_TENSORS.items():
            dtype = weight_dtype if field in names.WEIGHT_FIELDS else np.float32
            out[template.format(layer=layer)] = np.ascontiguousarray(getattr(pred, field), dtype=dtype)
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
    ]
    for key, value in params.calibration.items():
        rows.append((names.CALIBRATION_PREFIX + key, *_calibration_value(value)))
    return rows


def _check_params(params: AquaKVParams) -> None:
    if params.channel_order != "llama.cpp":
        raise ValueError("write_aqua_gguf needs predictors in llama.cpp channel order "
                         "(use params.with_channel_order('llama.cpp', permutes_qk=...))")
    c = params.n_channels
    if len(params.predictors) != params.n_layers or params.predictors[0] is not None:
        raise ValueError(f"need {params.n_layers} predictor slots with None at layer 0")
    for layer, pred in enumerate(params.predictors[1:], start=1):
        if pred is None:
            raise ValueError(f"layer {layer} has no predictor")
        for field, arr in pred.arrays().items():
            want = (c, c) if field in names.WEIGHT_FIELDS else (c,)
            if arr.shape != want:
                raise ValueError(f"layer {layer} {field}: shape {arr.shape}, expected {want}")


def write_aqua_gguf(src: str | os.PathLike[str], dst: str | os.PathLike[str], params: AquaKVParams, *,
                    weight_dtype: np.dtype = np.float16, progress: bool = True) -> Path:
    """Copy GGUF ``src`` to ``dst`` adding the AQUA-KV metadata and tensors of ``params``.

    ``params`` must be in llama.cpp channel order.  ``dst`` is replaced atomically (temp file in
    the same folder + ``os.replace``); ``src`` is never modified and may not be ``dst``.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    _check_params(params)
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise AquaKVFormatError(f"refusing to overwrite the input model {src}")
    try:
        reader = GGUFReader(src)
    except (ValueError, OSError, IndexError) as exc:
        raise AquaKVFormatError(f"{src}: not a readable GGUF file ({exc})") from exc
    if any(names.is_aquakv_key(k) for k in reader.fields) or any(names.is_aquakv_tensor(t.name) for t in reader.tensors):
        raise AquaKVFormatError(f"{src} already carries aquakv.* data: convert the original model instead")
    arch_field = reader.get_field("general.architecture")
    if arch_field is None:
        raise AquaKVFormatError(f"{src}: no general.architecture key")

    extra = aquakv_tensors(params, weight_dtype)
    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = GGUFWriter(tmp, arch=arch_field.contents())
        for field in reader.fields.values():
            # GGUF.* are the reader's view of the header; the writer adds general.architecture itself.
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue
            if field.name == "general.alignment":
                # Keeps the tensor data offsets of the copy aligned like the original.
                writer.add_custom_alignment(int(field.contents()))
                continue
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
        for key, value, vtype, sub_type in aquakv_metadata(params):
            writer.add_key_value(key, value, vtype, sub_type=sub_type)

        total = 0
        for t in reader.tensors:
            if t.data.nbytes != t.n_bytes:
                raise AquaKVFormatError(f"{src}: tensor {t.name} is truncated "
                                        f"({t.data.nbytes} of {t.n_bytes} bytes): the file is incomplete")
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
            total += t.n_bytes
        for name, arr in extra.items():
            writer.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)
            total += arr.nbytes

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=total, unit="B", unit_scale=True, desc="writing GGUF", disable=not progress) as bar:
            for t in reader.tensors:
                writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
                bar.update(t.n_bytes)
            for arr in extra.values():
                writer.write_tensor_data(arr)
                bar.update(arr.nbytes)
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%d original + %d aquakv tensors) in %.1f s", dst, len(reader.tensors), len(extra),
             time.perf_counter() - t0)
    return dst
