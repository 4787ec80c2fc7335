"""Next-token selection from a logits row (numpy): greedy, temperature, top-k, top-p."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """temperature <= 0 means greedy (argmax); top_k <= 0 and top_p >= 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    seed: int | None = None


class Sampler:
    """Draws tokens from logits with a private, seedable random generator."""

    def __init__(self, params: SamplingParams = SamplingParams()) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """logits: [n_vocab] float32 → token id."""
        p = self.params
        if p.temperature <= 0:
            return int(np.argmax(logits))
        scores = logits.astype(np.float64) / p.temperature
        order = np.argsort(-scores, kind="stable")
        if p.top_k > 0:
            order = order[: p.top_k]
        top = scores[order]
        probs = np.exp(top - top[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self._rng.choice(len(order), p=probs)])
