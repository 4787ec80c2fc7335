"""Calibration text -> token sequences and the train/held-out split."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import CalibrationTextError

log = logging.getLogger(__name__)


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of a text (windows then start with BOS, as in llama.cpp)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def tokenize_text(tokenizer: Any, text: str) -> np.ndarray:
    """``ids: [n_tokens]`` int64 of the whole text, without special tokens."""
    t0 = time.perf_counter()
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    log.info("tokenized %d characters into %d tokens in %.1f s", len(text), ids.size, time.perf_counter() - t0)
    return ids


@dataclass
class CalibrationSequences:
    """input_ids: ``[n_seq, seq_len]``; heldout: ``[n_seq]`` bool (True = held out)."""

    input_ids: torch.Tensor
    heldout: torch.Tensor
    text_tokens: int

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())


def make_sequences(tokenizer: Any, text: str, *, n_tokens: int, seq_len: int, heldout_fraction: float,
                   seed: int, min_train_tokens: int = 0, prefix_tokens: int = 0) -> CalibrationSequences:
    """Cut ``n_tokens`` tokens of ``text`` into sequences of ``seq_len`` spread evenly over the text.

    Sequences begin with BOS when the tokenizer adds one.  ``heldout_fraction`` of them (at
    least one), chosen with ``seed``, are held out.  Raises CalibrationTextError when the text is
    empty or yields fewer than two sequences or fewer than ``min_train_tokens`` training tokens
    (not counting the ``prefix_tokens`` sinks of each sequence, which are never quantized).
    """
    if not text or not text.strip():
        raise CalibrationTextError("calibration text is empty")
    if seq_len < 2 * max(1, prefix_tokens):
        raise CalibrationTextError(f"calibration sequence length {seq_len} is too short")
    bos = adds_bos(tokenizer)
    body = seq_len - int(bos)
    ids = tokenize_text(tokenizer, text)
    available = ids.size // body
    wanted = max(2, n_tokens // seq_len)
    if available < 2:
        raise CalibrationTextError(
            f"calibration text too short: {ids.size} tokens, need at least {2 * body} (two sequences of {seq_len})")
    if available < wanted:
        log.warning("calibration text has %d tokens: using %d sequences of %d instead of the %d requested",
                    ids.size, available, seq_len, wanted)
    n_seq = min(wanted, available)
    starts = np.unique(np.round(np.linspace(0, available - 1, n_seq)).astype(np.int64)) * body
    rows = np.stack([ids[s:s + body] for s in starts])
    if bos:
        rows = np.concatenate([np.full((rows.shape[0], 1), tokenizer.bos_token_id, dtype=np.int64), rows], axis=1)
    n_seq = rows.shape[0]
    n_held = min(n_seq - 1, max(1, int(round(heldout_fraction * n_seq))))
    heldout = np.zeros(n_seq, dtype=bool)
    heldout[np.random.default_rng(seed).choice(n_seq, size=n_held, replace=False)] = True
    train_tokens = int((~heldout).sum()) * (seq_len - prefix_tokens)
    if train_tokens < min_train_tokens:
        raise CalibrationTextError(
            f"calibration text too short: {train_tokens} training tokens, need at least {min_train_tokens}")
    return CalibrationSequences(torch.from_numpy(rows), torch.from_numpy(heldout), int(ids.size))
