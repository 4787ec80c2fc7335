"""A minimal, fast GGUF (v2/v3, little-endian) parser and an appending rewriter.

gguf-py's GGUFReader turns every string of the tokenizer arrays into a numpy object, which
takes seconds per read; converting or validating a model only needs the header, the scalar
keys and the tensor table.  This module walks the file with ``struct`` once, keeps each
key/value pair and tensor-info record as the exact bytes found in the file, and rewrites a
file by emitting those bytes unchanged, adding new pairs/records after them, and streaming the
tensor data section verbatim.  Tensor offsets in GGUF are relative to the data section, so the
original tensors keep their offsets and their bytes: the copy is byte-identical by
construction, whatever the weights' quantization.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from tqdm import tqdm

from .errors import AquaKVFormatError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NP = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


@dataclass
class RawField:
    """One key/value pair: its decoded value and its exact bytes in the file."""

    name: str
    vtype: GGUFValueType
    value: Any
    raw: bytes
    sub_type: GGUFValueType | None = None


@dataclass
class RawTensor:
    """One tensor-info record; ``ne`` lists dims fastest first, ``offset`` is relative to the data section."""

    name: str
    ne: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int
    raw: bytes

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return int(np.prod(self.ne, dtype=np.int64)) // block * size

    @property
    def np_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))


class _NeedMore(Exception):
    """The header continues past the bytes read so far."""


class _Cursor:
    def __init__(self, buf: bytes, path: Path, file_size: int):
        self.buf, self.pos, self.path, self.file_size = buf, 0, path, file_size

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.file_size:
            raise AquaKVFormatError(f"{self.path}: truncated or corrupt GGUF header (at byte {self.pos})")
        if self.pos + n > len(self.buf):
            raise _NeedMore
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AquaKVFormatError(f"{self.path}: corrupt GGUF string at byte {self.pos}") from exc

    def value(self, vtype: GGUFValueType) -> tuple[Any, GGUFValueType | None]:
        if vtype == GGUFValueType.STRING:
            return self.string(), None
        if vtype == GGUFValueType.ARRAY:
            sub = _vtype(self.unpack("<I"), self.path)
            n = self.unpack("<Q")
            if sub == GGUFValueType.STRING:
                return [self.string() for _ in range(n)], sub
            if sub == GGUFValueType.ARRAY:
                return [self.value(GGUFValueType.ARRAY)[0] for _ in range(n)], sub
            dt = np.dtype(_NP[sub])
            return np.frombuffer(self.take(n * dt.itemsize), dtype=dt).tolist(), sub
        return self.unpack(_SCALAR[vtype]), None


def _vtype(code: int, path: Path) -> GGUFValueType:
    try:
        return GGUFValueType(code)
    except ValueError:
        raise AquaKVFormatError(f"{path}: corrupt GGUF metadata (unknown value type {code})") from None


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


class RawGGUF:
    """Parsed header of a GGUF file (the tensor data stay on disk).

    fields: key -> RawField in file order; tensors: RawTensor in file order; data_start: absolute
    offset of the tensor data section; data_size: bytes up to the end of the last tensor.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_file():
            raise AquaKVFormatError(f"{self.path}: no such file")
        self.file_size = self.path.stat().st_size
        if self.file_size < 24:
            raise AquaKVFormatError(f"{self.path}: not a readable GGUF file (only {self.file_size} bytes)")
        # The header (metadata + tensor table) is read in growing prefixes: it is usually a few
        # MiB at the front of a file that may hold gigabytes of weights.
        size = 8 << 20
        with open(self.path, "rb") as f:
            while True:
                f.seek(0)
                buf = f.read(min(size, self.file_size))
                try:
                    self._parse(buf)
                    return
                except _NeedMore:
                    size *= 4

    def _parse(self, buf: bytes) -> None:
        cur = _Cursor(buf, self.path, self.file_size)
        if bytes(cur.take(4)) != MAGIC:
            raise AquaKVFormatError(f"{self.path}: not a readable GGUF file (bad magic)")
        self.version = cur.unpack("<I")
        if self.version not in (2, 3):
            raise AquaKVFormatError(f"{self.path}: GGUF version {self.version} is not supported "
                                    "(big-endian or pre-v2 files are not handled)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        if n_kv > 1 << 24 or n_tensors > 1 << 24:
            raise AquaKVFormatError(f"{self.path}: corrupt GGUF header (implausible counts)")
        self.kv_start = cur.pos
        self.fields: dict[str, RawField] = {}
        for _ in range(n_kv):
            start = cur.pos
            name = cur.string()
            vtype = _vtype(cur.unpack("<I"), self.path)
            value, sub = cur.value(vtype)
            if name in self.fields:
                raise AquaKVFormatError(f"{self.path}: duplicated metadata key {name}")
            self.fields[name] = RawField(name, vtype, value, bytes(buf[start:cur.pos]), sub)
        self.tensors: list[RawTensor] = []
        for _ in range(n_tensors):
            start = cur.pos
            name = cur.string()
            n_dims = cur.unpack("<I")
            if n_dims > 8:
                raise AquaKVFormatError(f"{self.path}: corrupt tensor info for {name}")
            ne = tuple(cur.unpack("<Q") for _ in range(n_dims))
            code = cur.unpack("<I")
            try:
                gtype = GGMLQuantizationType(code)
            except ValueError:
                raise AquaKVFormatError(f"{self.path}: tensor {name} has unknown type {code}") from None
            offset = cur.unpack("<Q")
            self.tensors.append(RawTensor(name, ne, gtype, offset, bytes(buf[start:cur.pos])))
        self.ti_end = cur.pos
        align = self.fields.get("general.alignment")
        self.alignment = int(align.value) if align is not None else DEFAULT_ALIGNMENT
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise AquaKVFormatError(f"{self.path}: invalid general.alignment {self.alignment}")
        self.data_start = _align(self.ti_end, self.alignment)
        self.data_size = max((t.offset + t.nbytes for t in self.tensors), default=0)
        if self.data_start + self.data_size > self.file_size:
            short = next(t for t in self.tensors if self.data_start + t.offset + t.nbytes > self.file_size)
            raise AquaKVFormatError(f"{self.path}: truncated file: tensor {short.name} ends past the end of the file "
                                    f"({self.file_size} bytes)")

    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return default if f is None else f.value

    def tensor(self, name: str) -> RawTensor | None:
        return next((t for t in self.tensors if t.name == name), None)

    def tensor_array(self, t: RawTensor) -> np.ndarray:
        """Data of an F32/F16 tensor as a numpy array of shape ``t.np_shape`` (copied into memory)."""
        dtype = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}.get(t.ggml_type)
        if dtype is None:
            raise TypeError(t.ggml_type.name)
        count = int(np.prod(t.ne, dtype=np.int64))
        arr = np.fromfile(self.path, dtype=np.dtype(dtype).newbyteorder("<"), count=count,
                          offset=self.data_start + t.offset)
        return arr.reshape(t.np_shape)

    def tensor_bytes(self, t: RawTensor) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.data_start + t.offset)
            return f.read(t.nbytes)


# -- encoding --------------------------------------------------------------------------------
def _pack_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _pack_value(value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _pack_string(value)
    if vtype == GGUFValueType.ARRAY:
        if sub_type is None:
            raise ValueError("arrays need a sub_type")
        items = list(value)
        out = struct.pack("<IQ", int(sub_type), len(items))
        if sub_type == GGUFValueType.STRING:
            return out + b"".join(_pack_string(s) for s in items)
        if sub_type == GGUFValueType.ARRAY:
            raise ValueError("nested arrays are not written")
        return out + np.asarray(items, dtype=_NP[sub_type]).tobytes()
    return struct.pack(_SCALAR[vtype], value)


def pack_field(name: str, value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None = None) -> bytes:
    """Bytes of one key/value pair."""
    return _pack_string(name) + struct.pack("<I", int(vtype)) + _pack_value(value, vtype, sub_type)


def _tensor_type(arr: np.ndarray) -> GGMLQuantizationType:
    if arr.dtype == np.float32:
        return GGMLQuantizationType.F32
    if arr.dtype == np.float16:
        return GGMLQuantizationType.F16
    raise TypeError(f"only f32/f16 tensors are written, got {arr.dtype}")


def _copy_range(src: BinaryIO, dst: BinaryIO, start: int, length: int, bar: tqdm) -> None:
    src.seek(start)
    left = length
    while left > 0:
        chunk = src.read(min(left, 16 << 20))
        if not chunk:
            raise AquaKVFormatError("source file shrank while copying")
        dst.write(chunk)
        left -= len(chunk)
        bar.update(len(chunk))


def rewrite(src: RawGGUF, dst: str | os.PathLike[str], *,
            add_fields: Iterable[tuple[str, Any, GGUFValueType, GGUFValueType | None]] = (),
            add_tensors: dict[str, np.ndarray] | None = None, replace_fields: dict[str, bytes] | None = None,
            drop_tensors: Iterable[str] = (), progress: bool = False) -> Path:
    """Write ``dst`` = ``src`` with pairs/tensors appended (temp file in dst's folder, then rename).

    Original pairs and tensor records are written from their file bytes (``replace_fields`` maps
    a key to replacement bytes from ``pack_field``; tests use it and ``drop_tensors`` to make
    malformed files); the data section is streamed unchanged, new tensors follow it, aligned.
    """
    dst = Path(dst)
    add_fields = list(add_fields)
    add_tensors = dict(add_tensors or {})
    replace_fields = dict(replace_fields or {})
    drop = set(drop_tensors)
    dup = {k for k, *_ in add_fields} & set(src.fields)
    if dup or set(add_tensors) & {t.name for t in src.tensors}:
        raise AquaKVFormatError(f"{src.path}: already has {sorted(dup)[:3] or 'tensors named like the additions'}")
    kv = [replace_fields.get(f.name, f.raw) for f in src.fields.values()] + [pack_field(*f) for f in add_fields]
    kept = [t for t in src.tensors if t.name not in drop]
    infos = [t.raw for t in kept]
    new_data: list[np.ndarray] = []
    offset = _align(src.data_size, src.alignment)
    for name, arr in add_tensors.items():
        arr = np.ascontiguousarray(arr)
        ne = tuple(reversed(arr.shape))
        infos.append(_pack_string(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", n) for n in ne)
                     + struct.pack("<IQ", int(_tensor_type(arr)), offset))
        new_data.append(arr)
        offset = _align(offset + arr.nbytes, src.alignment)

    header = MAGIC + struct.pack("<IQQ", src.version, len(infos), len(kv))
    head = header + b"".join(kv) + b"".join(infos)
    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        total = src.data_size + sum(a.nbytes for a in new_data)
        with os.fdopen(fd, "wb") as out, open(src.path, "rb") as inp, \
                tqdm(total=total, unit="B", unit_scale=True, desc="writing GGUF", disable=not progress) as bar:
            out.write(head)
            out.write(b"\0" * (_align(len(head), src.alignment) - len(head)))
            _copy_range(inp, out, src.data_start, src.data_size, bar)
            pos = src.data_size
            for arr in new_data:
                pad = _align(pos, src.alignment) - pos
                out.write(b"\0" * pad)
                out.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
                pos += pad + arr.nbytes
                bar.update(arr.nbytes)
            out.write(b"\0" * (_align(pos, src.alignment) - pos))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst
