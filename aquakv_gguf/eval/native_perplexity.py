"""Perplexity of a model under llama.cpp through the bindings.

Windows of ``window`` tokens are cut from the token stream back to back; each window
starts from an empty cache and is fed in steps of ``step`` tokens (``step = window``
is one pass; DESIGN §7 uses 32 so that attended tokens come from the cache). Every
token after the first of a window is scored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from aquakv_gguf.runtime import Context


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """logits: [..., n_vocab] → log-probabilities in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def windows(tokens: Sequence[int], window: int, n_windows: int) -> list[list[int]]:
    """The first n_windows consecutive windows of ``window`` tokens; ValueError if too short."""
    if len(tokens) < window * n_windows:
        raise ValueError(f"need {window * n_windows} tokens for {n_windows} windows of {window}, "
                         f"have {len(tokens)}")
    return [list(tokens[i * window:(i + 1) * window]) for i in range(n_windows)]


def window_logits(ctx: Context, tokens: Sequence[int], step: int) -> np.ndarray:
    """Logits [len(tokens), n_vocab] of one window, fed from an empty cache in ``step``-token steps."""
    ctx.clear()
    rows = [ctx.decode(tokens[i:i + step], pos_start=i, logits="all") for i in range(0, len(tokens), step)]
    return np.concatenate(rows, axis=0)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_per_window: list[float]  # mean negative log-likelihood of each window
    n_scored: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return (self.n_scored + len(self.nll_per_window)) / self.seconds


def perplexity(ctx: Context, tokens: Sequence[int], *, window: int = 512, n_windows: int = 20,
               step: int | None = None, progress: bool = True) -> PerplexityResult:
    """exp(mean NLL) over the scored tokens of ``n_windows`` windows."""
    step = step or window
    if window > ctx.n_ctx:
        raise ValueError(f"window {window} exceeds the context size {ctx.n_ctx}")
    t0 = time.perf_counter()
    nlls = []
    for win in tqdm(windows(tokens, window, n_windows), desc=f"perplexity ({window}-token windows)",
                    disable=not progress, unit="win"):
        logp = log_softmax(window_logits(ctx, win, step))
        target = np.asarray(win[1:])
        nlls.append(float(-logp[np.arange(len(target)), target].mean()))
    seconds = time.perf_counter() - t0
    return PerplexityResult(math.exp(float(np.mean(nlls))), nlls, n_windows * (window - 1), seconds)
