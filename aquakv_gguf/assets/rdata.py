"""A small standard-library reader for R's serialization format and lazy-load databases.

R stores a package's data sets in a lazy-load database: ``Rdata.rdx`` (a compressed
serialization of an index) and ``Rdata.rdb`` (one compressed serialization per object).
This module reads enough of the format (XDR, versions 2 and 3) for plain data: character,
logical, integer, double, complex and raw vectors, generic lists, pairlists, symbols,
attributes, references, and the compact ALTREP sequences. Code objects (closures with byte
code, external pointers, ...) are refused with :class:`AssetError`, so R itself is never
needed to get text out of an R package.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AssetError

__all__ = [
    "RObject",
    "RSymbol",
    "RPersistentRef",
    "NA_INTEGER",
    "unserialize",
    "decompress",
    "read_rds",
    "read_lazyload_db",
    "LazyLoadDB",
]

# SEXP type codes (R's Rinternals.h).
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP = 7, 8, 9, 10
INTSXP, REALSXP, CPLXSXP, STRSXP, DOTSXP = 13, 14, 15, 16, 17
VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP, RAWSXP, S4SXP = 19, 20, 21, 22, 23, 24, 25

# Pseudo types that only occur in serialized streams (serialize.c).
REFSXP = 255
NILVALUE_SXP = 254
GLOBALENV_SXP = 253
UNBOUNDVALUE_SXP = 252
MISSINGARG_SXP = 251
BASENAMESPACE_SXP = 250
NAMESPACESXP = 249
PACKAGESXP = 248
PERSISTSXP = 247
EMPTYENV_SXP = 242
BASEENV_SXP = 241
ATTRLANGSXP = 240
ATTRLISTSXP = 239
ALTREP_SXP = 238

NA_INTEGER = -(2**31)
_NA_REAL_LOW_WORD = 1954  # R marks NA_real_ as a NaN whose low word is 1954

_KIND = {
    NILSXP: "NULL", SYMSXP: "symbol", LISTSXP: "pairlist", CLOSXP: "closure",
    ENVSXP: "environment", PROMSXP: "promise", LANGSXP: "language", CHARSXP: "char",
    LGLSXP: "logical", INTSXP: "integer", REALSXP: "double", CPLXSXP: "complex",
    STRSXP: "character", DOTSXP: "...", VECSXP: "list", EXPRSXP: "expression",
    RAWSXP: "raw", S4SXP: "S4",
}

_SPECIAL_ENVS = {
    GLOBALENV_SXP: "R_GlobalEnv", EMPTYENV_SXP: "R_EmptyEnv", BASEENV_SXP: "R_BaseEnv",
    BASENAMESPACE_SXP: "R_BaseNamespace", UNBOUNDVALUE_SXP: "R_UnboundValue",
    MISSINGARG_SXP: "R_MissingArg",
}


# Kinds whose value is a list of (tag, value) cells rather than of plain elements.
_PAIRLIST_KINDS = frozenset({"pairlist", "language", "closure", "promise", "..."})


@dataclass
class RSymbol:
    """An R symbol (a name), e.g. the tag of a pairlist cell."""

    name: str


@dataclass
class RPersistentRef:
    """An object R wrote through a persistence hook (e.g. an environment kept elsewhere in
    a lazy-load database); only its names are kept, it is not resolved."""

    names: list[str | None]


@dataclass
class RObject:
    """One deserialized R value.

    ``value`` depends on ``kind``: ``list[str | None]`` for "character" (None is NA),
    ``list[int | None]`` for "integer", ``list[bool | None]`` for "logical",
    ``list[float]`` for "double", ``list[complex]`` for "complex", ``bytes`` for "raw",
    ``list[Any]`` for "list"/"expression", ``list[tuple[str | None, Any]]`` (tag, value)
    for "pairlist"/"language"/"closure"/..., a name for "environment", None for "NULL".
    """

    kind: str
    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str | None] | None:
        """The ``names`` attribute (or a pairlist's tags), if any."""
        if self.kind in _PAIRLIST_KINDS:
            return [tag for tag, _ in self.value]
        names = self.attributes.get("names")
        if isinstance(names, RObject) and names.kind == "character":
            return list(names.value)
        return None

    def __len__(self) -> int:
        return 0 if self.value is None else len(self.value)

    def __getitem__(self, key: int | str) -> Any:
        """Element by position, or by name for named vectors, lists and pairlists."""
        if isinstance(key, int):
            index = key
        else:
            names = self.names
            if names is None or key not in names:
                raise KeyError(f"R {self.kind} has no element named {key!r}")
            index = names.index(key)
        item = self.value[index]
        return item[1] if self.kind in _PAIRLIST_KINDS else item

    def as_dict(self) -> dict[str, Any]:
        """Named elements as a dict (unnamed elements are skipped)."""
        names = self.names or []
        values = [self[i] for i in range(len(self))]
        return {n: v for n, v in zip(names, values) if n}


class _Reader:
    """Cursor over one XDR serialization stream."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise AssetError(
                f"truncated R serialization: wanted {n} bytes at offset {self.pos}, "
                f"stream has {len(self.data)}")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more words, upper then lower
            upper, lower = struct.unpack(">II", self.take(8))
            n = (upper << 32) | lower
        elif n < -1:
            raise AssetError(f"invalid R vector length {n} at offset {self.pos - 4}")
        return n

    def string_vec(self) -> list[str | None]:
        # Persistent names and namespace specs: a zero word, a length, then CHARSXP items.
        if self.int() != 0:
            raise AssetError("names in R's persistent string vectors are not supported")
        return [self.item() for _ in range(self.length())]

    def charsxp(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None
        raw = self.take(n)
        # R's encoding flags: LATIN1 (1<<2), UTF8 (1<<3), BYTES (1<<1), ASCII (1<<6).
        if levels & (1 << 2):
            return raw.decode("latin-1")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if levels & (1 << 1):
                return raw.decode("latin-1")
            raise AssetError(f"R string at offset {self.pos - n} is not valid UTF-8") from None

    def attributes(self) -> dict[str, Any]:
        attrs = self.item()
        if attrs is None:
            return {}
        if not isinstance(attrs, RObject) or attrs.kind != "pairlist":
            raise AssetError("R attributes are not stored as a pairlist")
        return {tag or "": value for tag, value in attrs.value}

    def item(self) -> Any:
        flags = self.int()
        sexptype = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if sexptype == NILVALUE_SXP:
            return None
        if sexptype in _SPECIAL_ENVS:
            return RObject("environment", _SPECIAL_ENVS[sexptype])
        if sexptype == REFSXP:
            index = flags >> 8
            if index == 0:
                index = self.int()
            if not 1 <= index <= len(self.refs):
                raise AssetError(f"R reference {index} points outside the {len(self.refs)} read")
            return self.refs[index - 1]
        if sexptype == PERSISTSXP:
            ref = RPersistentRef(self.string_vec())
            self.refs.append(ref)
            return ref
        if sexptype == SYMSXP:
            name = self.item()
            sym = RSymbol(name if isinstance(name, str) else "")
            self.refs.append(sym)
            return sym
        if sexptype in (PACKAGESXP, NAMESPACESXP):
            env = RObject("environment", self.string_vec())
            self.refs.append(env)
            return env
        if sexptype == ENVSXP:
            env = RObject("environment", None)
            self.refs.append(env)  # registered first: the frame may refer back to it
            locked = self.int()
            enclos, frame, hashtab, attrs = self.item(), self.item(), self.item(), self.item()
            env.value = {"locked": bool(locked), "enclos": enclos, "frame": frame,
                         "hashtab": hashtab}
            if isinstance(attrs, RObject) and attrs.kind == "pairlist":
                env.attributes = {tag or "": v for tag, v in attrs.value}
            return env
        if sexptype in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP):
            return self.pairlist(sexptype, has_attr, has_tag)
        if sexptype == ALTREP_SXP:
            return self.altrep()
        if sexptype == CHARSXP:
            return self.charsxp(levels)

        obj = self.vector(sexptype)
        if has_attr:
            obj.attributes = self.attributes()
        return obj

    def pairlist(self, sexptype: int, has_attr: bool, has_tag: bool) -> RObject:
        kind = {ATTRLANGSXP: "language", ATTRLISTSXP: "pairlist"}.get(sexptype, _KIND[sexptype])
        if sexptype in (CLOSXP, PROMSXP):
            # Not a list: the tag is the environment, car the formals/value, cdr the body/code.
            attrs = self.attributes() if has_attr else {}
            env = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            return RObject(kind, [("env", env), ("car", car), ("cdr", cdr)], attrs)
        cells: list[tuple[str | None, Any]] = []
        attrs = {}
        # Walk the cdr chain in a loop: long pairlists would otherwise recurse once per cell.
        while True:
            # The old ATTR* forms always carry attributes, whatever the flag says.
            cell_attrs = self.attributes() if has_attr or sexptype in (ATTRLANGSXP, ATTRLISTSXP) else {}
            if not cells:
                attrs = cell_attrs
            tag = self.item() if has_tag else None
            car = self.item()
            cells.append((tag.name if isinstance(tag, RSymbol) else None, car))
            flags = self.int()
            sexptype = flags & 0xFF
            if sexptype == NILVALUE_SXP:
                break
            if sexptype not in (LISTSXP, ATTRLISTSXP, DOTSXP):
                # A dotted pair: the cdr is an ordinary object, kept as a last untagged cell.
                self.pos -= 4
                cells.append((None, self.item()))
                break
            has_attr = bool(flags & (1 << 9))
            has_tag = bool(flags & (1 << 10))
        return RObject(kind, cells, attrs)

    def vector(self, sexptype: int) -> RObject:
        if sexptype == S4SXP:
            return RObject("S4", None)
        if sexptype not in (LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP, VECSXP, EXPRSXP, RAWSXP):
            name = _KIND.get(sexptype, f"type {sexptype}")
            raise AssetError(f"unsupported R object ({name}, SEXP type {sexptype}) at offset "
                             f"{self.pos - 4}: only data vectors and lists can be read")
        n = self.length()
        kind = _KIND[sexptype]
        if sexptype == STRSXP:
            values: Any = []
            for _ in range(n):
                item = self.item()
                if item is not None and not isinstance(item, str):
                    raise AssetError("an R character vector holds a non-string element")
                values.append(item)
            return RObject(kind, values)
        if sexptype in (VECSXP, EXPRSXP):
            return RObject(kind, [self.item() for _ in range(n)])
        if sexptype == RAWSXP:
            return RObject(kind, self.take(n))
        if sexptype in (LGLSXP, INTSXP):
            ints = struct.unpack(f">{n}i", self.take(4 * n))
            if sexptype == LGLSXP:
                return RObject(kind, [None if v == NA_INTEGER else bool(v) for v in ints])
            return RObject(kind, [None if v == NA_INTEGER else v for v in ints])
        if sexptype == REALSXP:
            return RObject(kind, list(struct.unpack(f">{n}d", self.take(8 * n))))
        parts = struct.unpack(f">{2 * n}d", self.take(16 * n))
        return RObject(kind, [complex(parts[i], parts[i + 1]) for i in range(0, 2 * n, 2)])

    def altrep(self) -> RObject:
        info = self.item()
        state = self.item()
        attrs = self.item()
        cls = None
        if isinstance(info, RObject) and info.kind == "pairlist" and info.value:
            head = info.value[0][1]
            cls = head.name if isinstance(head, RSymbol) else None
        obj = self._expand_altrep(cls, state)
        if isinstance(attrs, RObject) and attrs.kind == "pairlist":
            obj.attributes = {tag or "": v for tag, v in attrs.value}
        return obj

    @staticmethod
    def _expand_altrep(cls: str | None, state: Any) -> RObject:
        # R writes compact sequences and wrappers in ALTREP form only when the class is
        # known to the writer; these are the ones base R ships.
        if cls in ("compact_intseq", "compact_realseq") and isinstance(state, RObject):
            n, start, step = state.value[:3]
            seq = [start + i * step for i in range(int(n))]
            if cls == "compact_intseq":
                return RObject("integer", [int(v) for v in seq])
            return RObject("double", [float(v) for v in seq])
        if cls and cls.startswith("wrap_") and isinstance(state, RObject) and state.value:
            inner = state.value[0]
            if isinstance(inner, RObject):
                return RObject(inner.kind, inner.value, dict(inner.attributes))
        if cls == "deferred_string" and isinstance(state, RObject) and state.value:
            arg = state.value[0][1] if state.kind == "pairlist" else state.value[0]
            if isinstance(arg, RObject) and arg.kind in ("integer", "double"):
                return RObject("character", [None if v is None else _num_to_r_string(v)
                                             for v in arg.value])
        raise AssetError(f"unsupported R ALTREP class {cls!r}")


def _num_to_r_string(v: float | int) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def unserialize(data: bytes) -> Any:
    """Deserialize one uncompressed R serialization stream (``serialize()`` output).

    Only the XDR format (header ``X\\n``) of versions 2 and 3 is read, which is what R
    writes for packages and ``saveRDS``.
    """
    if data[:2] != b"X\n":
        fmt = data[:2]
        raise AssetError(f"unsupported R serialization format {fmt!r}: only XDR ('X\\n') is read")
    reader = _Reader(data)
    reader.pos = 2
    version = reader.int()
    reader.int()  # the writer's R version
    reader.int()  # the oldest R version that can read it
    if version == 3:
        reader.take(reader.int())  # the writer's native encoding, e.g. "UTF-8"
    elif version != 2:
        raise AssetError(f"unsupported R serialization version {version} (2 and 3 are read)")
    return reader.item()


def decompress(data: bytes) -> bytes:
    """Undo the compression R uses for .rds/.rdx files, recognised by its magic bytes.

    Uncompressed XDR streams pass through; gzip, bzip2 and xz files are inflated; anything
    else is taken as a 4-byte big-endian length followed by a zlib stream.
    """
    try:
        if data[:2] == b"X\n":
            return data
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        if data[:3] == b"BZh":
            return bz2.decompress(data)
        if data[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(data)
        return _decompress_record(data, 1)
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as exc:
        raise AssetError(f"cannot decompress R data: {exc}") from exc


def _decompress_record(blob: bytes, compression: int) -> bytes:
    """One lazy-load record: a 4-byte big-endian uncompressed length, then the payload.

    ``compression`` 1 is zlib; 2 and 3 put a type byte first ('Z' zlib, '2' bzip2,
    'X' xz, '0' stored), as R's ``lazyLoadDBinsertValue`` writes them.
    """
    if len(blob) < 4:
        raise AssetError("truncated R lazy-load record")
    expected = struct.unpack(">I", blob[:4])[0]
    payload = blob[4:]
    try:
        if compression in (2, 3):
            kind, payload = payload[:1], payload[1:]
            if kind == b"Z":
                out = zlib.decompress(payload)
            elif kind == b"2":
                out = bz2.decompress(payload)
            elif kind == b"X":
                out = lzma.decompress(payload)
            elif kind == b"0":
                out = payload
            else:
                raise AssetError(f"unknown R lazy-load compression type {kind!r}")
        elif compression == 1:
            out = zlib.decompress(payload)
        else:
            out = payload
    except (zlib.error, OSError, EOFError, lzma.LZMAError) as exc:
        raise AssetError(f"corrupt R lazy-load record: {exc}") from exc
    if len(out) != expected:
        raise AssetError(f"R lazy-load record inflated to {len(out)} bytes, header says {expected}")
    return out


def read_rds(path: Path) -> Any:
    """Read an ``.rds`` file (``saveRDS`` output, usually gzip-compressed)."""
    return unserialize(decompress(Path(path).read_bytes()))


class LazyLoadDB:
    """An R lazy-load database (``NAME.rdx`` index + ``NAME.rdb`` records).

    Objects are read on demand with :meth:`get`; :attr:`names` lists them.
    """

    def __init__(self, rdb: Path, rdx: Path) -> None:
        self.rdb = Path(rdb)
        self.rdx = Path(rdx)
        for path in (self.rdb, self.rdx):
            if not path.is_file():
                raise AssetError(f"R lazy-load database file {path} is missing")
        index = read_rds(self.rdx)
        if not isinstance(index, RObject) or index.kind != "list" or "variables" not in (index.names or []):
            raise AssetError(f"{self.rdx} is not an R lazy-load index (no 'variables' entry)")
        compressed = index["compressed"] if "compressed" in (index.names or []) else None
        self.compression = _compression_code(compressed)
        variables = index["variables"]
        self._where: dict[str, tuple[int, int]] = {}
        for name, pos in variables.as_dict().items():
            if not isinstance(pos, RObject) or pos.kind not in ("integer", "double") or len(pos) != 2:
                raise AssetError(f"{self.rdx}: bad (offset, length) for {name!r}")
            self._where[name] = (int(pos.value[0]), int(pos.value[1]))

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> Any:
        if name not in self._where:
            raise AssetError(f"{self.rdb} has no object {name!r} (has: {', '.join(self._where)})")
        offset, length = self._where[name]
        with self.rdb.open("rb") as fh:
            fh.seek(offset)
            blob = fh.read(length)
        if len(blob) != length:
            raise AssetError(f"{self.rdb} is truncated: {name!r} needs bytes "
                             f"{offset}..{offset + length}")
        return unserialize(_decompress_record(blob, self.compression))


def _compression_code(compressed: Any) -> int:
    if compressed is None:
        return 1  # R's default for lazy-load databases is zlib
    if isinstance(compressed, RObject) and compressed.value:
        value = compressed.value[0]
        if isinstance(value, bool):
            return 1 if value else 0
        if isinstance(value, (int, float)):
            return int(value)
    raise AssetError(f"unrecognised 'compressed' entry in an R lazy-load index: {compressed!r}")


def read_lazyload_db(rdb: Path, rdx: Path) -> dict[str, Any]:
    """Every object of an R lazy-load database, by name."""
    db = LazyLoadDB(rdb, rdx)
    return {name: db.get(name) for name in db.names}
