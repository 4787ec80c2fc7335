"""A loaded llama.cpp model: metadata, vocabulary, tokenization."""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from aquakv_gguf.runtime._ffi import AQUAKV_ERR_EXCEPTION, ffi, lib
from aquakv_gguf.runtime.errors import LlamaError
from aquakv_gguf.runtime.handle import NativeHandle

if TYPE_CHECKING:
    from aquakv_gguf.runtime.context import Context

KvValue = bool | int | float | str


def log_tail() -> str:
    """The last lines llama.cpp logged in this process."""
    L = lib()
    n = L.aquakv_log_tail(ffi.NULL, 0)
    buf = ffi.new("char[]", n + 1)
    L.aquakv_log_tail(buf, n + 1)
    return ffi.string(buf).decode("utf-8", errors="replace")


def format_kv_overrides(overrides: Mapping[str, KvValue]) -> str:
    """{"aquakv.enabled": False} → "aquakv.enabled=bool:false" lines (llama.cpp's syntax)."""
    lines = []
    for key, value in overrides.items():
        if not key or "\n" in key or "=" in key:
            raise ValueError(f"invalid kv override key {key!r}")
        if isinstance(value, bool):
            lines.append(f"{key}=bool:{'true' if value else 'false'}")
        elif isinstance(value, int):
            lines.append(f"{key}=int:{value}")
        elif isinstance(value, float):
            lines.append(f"{key}=float:{value!r}")
        elif isinstance(value, str):
            if "\n" in value:
                raise ValueError(f"kv override {key!r}: value must be one line")
            lines.append(f"{key}=str:{value}")
        else:
            raise TypeError(f"kv override {key!r}: unsupported value type {type(value).__name__}")
    return "\n".join(lines)


class Model(NativeHandle):
    """A GGUF model loaded by the patched libllama.

    Use as a context manager (or call :meth:`close`) to free it deterministically;
    closing a model closes the contexts created from it first. ``aquakv``: None keeps the file's
    choice (a model.aqua.gguf gets the AQUA-KV cache), False gives an ordinary cache, True asks
    for AQUA-KV (an error for a file without AQUA-KV data only when a context is created).
    """

    _kind = "model"

    def __init__(self, path: str | os.PathLike[str], *, n_gpu_layers: int = 0, use_mmap: bool = True,
                 vocab_only: bool = False, kv_overrides: Mapping[str, KvValue] | None = None,
                 aquakv: bool | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        self._lib = lib()
        overrides_map = dict(kv_overrides or {})
        if aquakv is not None:
            # the same switch as the tools' --override-kv aquakv.enabled=bool:false
            overrides_map["aquakv.enabled"] = bool(aquakv)
        overrides = format_kv_overrides(overrides_map)
        self._lib.aquakv_log_clear()
        handle = self._lib.aquakv_model_load(str(self.path).encode(), n_gpu_layers, use_mmap, vocab_only,
                                             overrides.encode() if overrides else ffi.NULL)
        if handle == ffi.NULL:
            raise LlamaError(f"llama.cpp could not load {self.path}", log_tail())
        self._handle = handle
        self._vocab = self._lib.llama_model_get_vocab(handle)
        self._contexts: weakref.WeakSet[Context] = weakref.WeakSet()

    # -- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        for ctx in list(getattr(self, "_contexts", ())):
            ctx.close()
        super().close()

    def _free(self, handle) -> None:
        self._vocab = None
        self._lib.llama_model_free(handle)

    def context(self, **kwargs) -> Context:
        """Create a :class:`Context` on this model (see its arguments)."""
        from aquakv_gguf.runtime.context import Context
        return Context(self, **kwargs)

    # -- metadata ---------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return int(self._lib.llama_vocab_n_tokens(self._vocab_handle()))

    @property
    def n_layer(self) -> int:
        return int(self._lib.llama_model_n_layer(self.handle))

    @property
    def n_embd(self) -> int:
        return int(self._lib.llama_model_n_embd(self.handle))

    @property
    def n_head(self) -> int:
        return int(self._lib.llama_model_n_head(self.handle))

    @property
    def n_head_kv(self) -> int:
        return int(self._lib.llama_model_n_head_kv(self.handle))

    @property
    def n_ctx_train(self) -> int:
        return int(self._lib.llama_model_n_ctx_train(self.handle))

    @property
    def n_params(self) -> int:
        return int(self._lib.llama_model_n_params(self.handle))

    @property
    def size_bytes(self) -> int:
        return int(self._lib.llama_model_size(self.handle))

    @property
    def description(self) -> str:
        buf = ffi.new("char[]", 256)
        self._lib.llama_model_desc(self.handle, buf, 256)
        return ffi.string(buf).decode()

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as llama.cpp formats it, or None when absent."""
        size = 256
        while True:
            buf = ffi.new("char[]", size)
            n = self._lib.llama_model_meta_val_str(self.handle, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return ffi.string(buf).decode("utf-8", errors="replace")
            size = n + 1

    def meta_keys(self) -> list[str]:
        keys = []
        buf = ffi.new("char[]", 512)
        for i in range(self._lib.llama_model_meta_count(self.handle)):
            if self._lib.llama_model_meta_key_by_index(self.handle, i, buf, 512) >= 0:
                keys.append(ffi.string(buf).decode())
        return keys

    # -- vocabulary -------------------------------------------------------------------
    @staticmethod
    def _check(n: int, what: str) -> None:
        if n == AQUAKV_ERR_EXCEPTION:
            raise LlamaError(f"llama.cpp failed to {what} with this model's vocabulary", log_tail())

    def _vocab_handle(self):
        self.handle  # raises when closed
        return self._vocab

    @property
    def bos(self) -> int:
        return int(self._lib.llama_vocab_bos(self._vocab_handle()))

    @property
    def eos(self) -> int:
        return int(self._lib.llama_vocab_eos(self._vocab_handle()))

    @property
    def add_bos(self) -> bool:
        return bool(self._lib.llama_vocab_get_add_bos(self._vocab_handle()))

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab_handle(), token))

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text`` (with BOS when the model adds one and add_special)."""
        data = text.encode("utf-8")
        cap = len(data) + 16
        while True:
            out = ffi.new("llama_token[]", cap)
            n = self._lib.aquakv_tokenize(self._vocab_handle(), data, len(data), out, cap, add_special,
                                          parse_special)
            self._check(n, "tokenize")
            if n >= 0:
                return list(out[0:n])
            if -n <= cap:
                raise LlamaError("llama_tokenize failed", log_tail())
            cap = -n

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """Raw bytes of one token (may be a partial UTF-8 sequence)."""
        size = 64
        while True:
            buf = ffi.new("char[]", size)
            n = self._lib.aquakv_token_to_piece(self._vocab_handle(), token, buf, size, special)
            self._check(n, "token_to_piece")
            if n >= 0:
                return ffi.unpack(buf, n)
            size = -n

    def detokenize(self, tokens: Sequence[int], *, remove_special: bool = False,
                   unparse_special: bool = False) -> str:
        arr = ffi.new("llama_token[]", list(tokens))
        size = max(64, 8 * len(tokens))
        while True:
            buf = ffi.new("char[]", size)
            n = self._lib.aquakv_detokenize(self._vocab_handle(), arr, len(tokens), buf, size,
                                            remove_special, unparse_special)
            self._check(n, "detokenize")
            if n >= 0:
                return ffi.unpack(buf, n).decode("utf-8", errors="replace")
            size = -n
