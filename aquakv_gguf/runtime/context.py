"""An inference context: KV cache, decoding, logits, sequences, state, generation."""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from aquakv_gguf.runtime._ffi import ffi
from aquakv_gguf.runtime.errors import ContextFullError, LlamaError
from aquakv_gguf.runtime.handle import NativeHandle
from aquakv_gguf.runtime.model import Model, log_tail
from aquakv_gguf.runtime.sampling import Sampler, SamplingParams

LogitsMode = Literal["last", "all", "none"]
_FLASH_ATTN = {None: -1, "auto": -1, False: 0, "off": 0, True: 1, "on": 1}


def cache_type_id(name: str) -> int:
    """ggml type id of a KV cache type name ("f16", "q8_0", "q4_0", ...)."""
    from aquakv_gguf.runtime._ffi import lib
    tid = lib().aquakv_type_from_name(name.encode())
    if tid < 0:
        raise ValueError(f"unknown cache type {name!r} (use a ggml type name such as f16, q8_0, q4_0)")
    return tid


@dataclass(frozen=True)
class GenerationStep:
    """One generated token: its id, the text it completes (may be empty mid-UTF-8) and position."""

    token: int
    text: str
    pos: int


class Context(NativeHandle):
    """A llama.cpp context on a :class:`Model`; close it (or use ``with``) to free the cache.

    Arguments mirror the llama.cpp tools: ``n_ctx`` (-c), ``n_batch`` (-b), ``n_ubatch`` (-ub),
    ``n_seq_max`` (-np), ``type_k``/``type_v`` (-ctk/-ctv), ``flash_attn`` (-fa: None = auto),
    ``kv_unified`` (--kv-unified), ``n_threads`` (-t; default: all cores), ``op_offload`` (--no-op-offload
    when False: with a GPU build, keeps an ngl-0 model entirely on the CPU).
    """

    _kind = "context"

    def __init__(self, model: Model, *, n_ctx: int = 2048, n_batch: int = 512, n_ubatch: int = 512,
                 n_seq_max: int = 1, n_threads: int | None = None, type_k: str = "f16", type_v: str = "f16",
                 flash_attn: bool | str | None = None, kv_unified: bool = False,
                 offload_kqv: bool = True, op_offload: bool = True) -> None:
        if flash_attn not in _FLASH_ATTN:
            raise ValueError(f"flash_attn must be None/'auto', True/'on' or False/'off', not {flash_attn!r}")
        if min(n_ctx, n_batch, n_ubatch, n_seq_max) <= 0:
            raise ValueError("n_ctx, n_batch, n_ubatch and n_seq_max must be positive")
        self.model = model
        self._lib = model._lib
        self._lib.aquakv_log_clear()
        handle = self._lib.aquakv_context_new(
            model.handle, n_ctx, n_batch, n_ubatch, n_seq_max, n_threads or os.cpu_count() or 1,
            cache_type_id(type_k), cache_type_id(type_v), _FLASH_ATTN[flash_attn], kv_unified, offload_kqv,
            op_offload)
        if handle == ffi.NULL:
            raise LlamaError(f"llama.cpp could not create a context (n_ctx={n_ctx}, type_k={type_k}, "
                             f"type_v={type_v}, flash_attn={flash_attn})", log_tail())
        self._handle = handle
        self._mem = self._lib.llama_get_memory(handle)
        self.n_vocab = model.n_vocab
        model._contexts.add(self)

    # -- lifetime ---------------------------------------------------------------------
    def _free(self, handle) -> None:
        self._mem = None
        self._lib.llama_free(handle)

    @property
    def n_ctx(self) -> int:
        return int(self._lib.llama_n_ctx(self.handle))

    @property
    def n_batch(self) -> int:
        return int(self._lib.llama_n_batch(self.handle))

    @property
    def n_seq_max(self) -> int:
        return int(self._lib.llama_n_seq_max(self.handle))

    # -- decoding ---------------------------------------------------------------------
    def decode_batch(self, tokens: Sequence[int], pos: Sequence[int], seq_ids: Sequence[int],
                     want_logits: Sequence[bool]) -> np.ndarray:
        """One llama_decode of tokens from any sequences (len ≤ n_batch).

        Returns logits [n_wanted, n_vocab] (float32) for the tokens flagged in want_logits,
        in batch order.
        """
        n = len(tokens)
        if not (len(pos) == len(seq_ids) == len(want_logits) == n):
            raise ValueError("tokens, pos, seq_ids and want_logits must have the same length")
        if n == 0:
            raise ValueError("decode_batch needs at least one token")
        if n > self.n_batch:
            raise ValueError(f"batch of {n} tokens exceeds n_batch={self.n_batch}")
        if any(t < 0 or t >= self.n_vocab for t in tokens):
            raise ValueError(f"token id out of range [0, {self.n_vocab})")
        flags = [1 if w else 0 for w in want_logits]
        self._lib.aquakv_log_clear()
        ret = self._lib.aquakv_decode(self.handle, ffi.new("llama_token[]", list(tokens)),
                                      ffi.new("llama_pos[]", list(pos)), ffi.new("llama_seq_id[]", list(seq_ids)),
                                      ffi.new("int8_t[]", flags), n)
        if ret == 1:
            raise ContextFullError(f"no room in the KV cache for {n} tokens (n_ctx={self.n_ctx})", log_tail())
        if ret != 0:
            raise LlamaError(f"llama_decode failed with status {ret}", log_tail())
        out = np.empty((sum(flags), self.n_vocab), dtype=np.float32)
        for row, i in enumerate(i for i, f in enumerate(flags) if f):
            ptr = self._lib.llama_get_logits_ith(self.handle, i)
            if ptr == ffi.NULL:
                raise LlamaError(f"no logits for batch index {i}", log_tail())
            out[row] = np.frombuffer(ffi.buffer(ptr, 4 * self.n_vocab), dtype=np.float32)
        return out

    def decode(self, tokens: Sequence[int], *, seq_id: int = 0, pos_start: int | None = None,
               logits: LogitsMode = "last") -> np.ndarray | None:
        """Append ``tokens`` to sequence ``seq_id`` (in chunks of n_batch).

        pos_start defaults to the sequence's next position. Returns the last token's logits
        [n_vocab] ("last"), every token's [n_tokens, n_vocab] ("all") or None ("none").
        """
        if logits not in ("last", "all", "none"):
            raise ValueError(f"logits must be 'last', 'all' or 'none', not {logits!r}")
        tokens = list(tokens)
        if not tokens:
            raise ValueError("decode needs at least one token")
        start = self.seq_pos_max(seq_id) + 1 if pos_start is None else pos_start
        step = self.n_batch
        rows = []
        for i in range(0, len(tokens), step):
            chunk = tokens[i:i + step]
            want = [logits == "all"] * len(chunk)
            if logits == "last" and i + step >= len(tokens):
                want[-1] = True
            out = self.decode_batch(chunk, range(start + i, start + i + len(chunk)), [seq_id] * len(chunk), want)
            if len(out):
                rows.append(out)
        if logits == "none":
            return None
        return rows[-1][-1].copy() if logits == "last" else np.concatenate(rows, axis=0)

    # -- sequences --------------------------------------------------------------------
    def seq_pos_max(self, seq_id: int = 0) -> int:
        """Largest cached position of the sequence, -1 when empty."""
        return int(self._lib.llama_memory_seq_pos_max(self._memory(), seq_id))

    def seq_pos_min(self, seq_id: int = 0) -> int:
        return int(self._lib.llama_memory_seq_pos_min(self._memory(), seq_id))

    def seq_rm(self, seq_id: int = -1, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions [p0, p1) of the sequence (-1: all sequences / open ends)."""
        return bool(self._lib.llama_memory_seq_rm(self._memory(), seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self._lib.llama_memory_seq_cp(self._memory(), src, dst, p0, p1)

    def seq_keep(self, seq_id: int) -> None:
        self._lib.llama_memory_seq_keep(self._memory(), seq_id)

    def seq_add(self, seq_id: int, p0: int, p1: int, delta: int) -> None:
        """Shift positions [p0, p1) of the sequence by delta (context shift)."""
        self._lib.llama_memory_seq_add(self._memory(), seq_id, p0, p1, delta)

    def clear(self) -> None:
        """Empty the KV cache (all sequences)."""
        self._lib.llama_memory_clear(self._memory(), True)

    def cache_info(self) -> dict[str, int] | None:
        """Sizes of the AQUA-KV cache, or None when this context uses an ordinary cache.

        Keys: ``codes_bytes`` (packed codes and f16 scales), ``window_bytes`` (f16 sinks and
        recent tokens), ``cells`` (per stream), ``streams``, ``window_slots`` (per stream).
        """
        out = ffi.new("int64_t[5]")
        if not self._lib.aquakv_context_cache_info(self.handle, out):
            return None
        keys = ("codes_bytes", "window_bytes", "cells", "streams", "window_slots")
        return {k: int(out[i]) for i, k in enumerate(keys)}

    def _memory(self):
        self.handle  # raises when closed
        return self._mem

    # -- state ------------------------------------------------------------------------
    def save_state(self) -> bytes:
        """The whole context state (KV cache, logits) as bytes."""
        size = self._lib.llama_state_get_size(self.handle)
        buf = ffi.new("uint8_t[]", size)
        n = self._lib.llama_state_get_data(self.handle, buf, size)
        return bytes(ffi.buffer(buf, n))

    def load_state(self, data: bytes) -> None:
        self._lib.aquakv_log_clear()
        n = self._lib.llama_state_set_data(self.handle, ffi.from_buffer("uint8_t[]", data), len(data))
        if n == 0:
            raise LlamaError("llama.cpp rejected the state", log_tail())

    def save_seq_state(self, seq_id: int = 0) -> bytes:
        size = self._lib.llama_state_seq_get_size(self.handle, seq_id)
        buf = ffi.new("uint8_t[]", size)
        n = self._lib.llama_state_seq_get_data(self.handle, buf, size, seq_id)
        return bytes(ffi.buffer(buf, n))

    def load_seq_state(self, data: bytes, seq_id: int = 0) -> None:
        self._lib.aquakv_log_clear()
        n = self._lib.llama_state_seq_set_data(self.handle, ffi.from_buffer("uint8_t[]", data), len(data), seq_id)
        if n == 0:
            raise LlamaError(f"llama.cpp rejected the state of sequence {seq_id}", log_tail())

    # -- generation -------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 128,
                 sampling: SamplingParams = SamplingParams(), seq_id: int = 0,
                 stop_at_eog: bool = True) -> Iterator[GenerationStep]:
        """Stream tokens after ``prompt`` (text is tokenized with the model's special tokens).

        The prompt is appended to what the sequence already holds. Each step carries the
        token and the text it completes, decoded incrementally so multi-byte characters
        split over tokens come out whole.
        """
        tokens = self.model.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        logits = self.decode(tokens, seq_id=seq_id)
        sampler = Sampler(sampling)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for _ in range(max_tokens):
            token = sampler(logits)
            if stop_at_eog and self.model.is_eog(token):
                break
            pos = self.seq_pos_max(seq_id) + 1
            yield GenerationStep(token, utf8.decode(self.model.token_to_piece(token)), pos)
            logits = self.decode([token], seq_id=seq_id)
