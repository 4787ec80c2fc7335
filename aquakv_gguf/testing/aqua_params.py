"""Random AQUA-KV parameters of the right shapes, for tests that need a model.aqua.gguf fast."""

from __future__ import annotations

import numpy as np

from aquakv_gguf.gguf_io import AquaKVParams, LayerPredictor, LowRankFactors
from aquakv_gguf.quant import choose_group_size, gaussian_grid


def random_aquakv_params(n_layers: int, n_kv_heads: int, head_dim: int, *, seed: int = 0, n_points: int = 16,
                         n_points0: int = 256, scale: float = 0.05, block_size: int = 0, rank_k: int = 0,
                         rank_v: int = 0, value_input: str = "v_prev") -> AquaKVParams:
    """Predictors drawn from N(0, scale²), in llama.cpp channel order; Gaussian grids of the given sizes.

    block_size N > 0 keeps only the diagonal [N, N] blocks of every weight (block-diagonal predictors).
    rank_k R_k > 0 makes low-rank predictors (form "lowrank") with key rank R_k and value rank
    ``rank_v or rank_k``: up-factors U ``[C, R]`` from N(0, 1/C) (columns of about unit norm, like
    the fitted eigenvectors), down-factors D ``[R, C]`` from N(0, scale²), so that ``‖U·D‖`` stays
    at most about a dense predictor's and the chain stays bounded.  The factors are f16-representable
    (what the file stores), so the dense products equal those a reader computes from the file.
    value_input "k_prev": the second value input is the previous layer's keys (no value chain).
    """
    if rank_v and not rank_k:
        raise ValueError("rank_v needs rank_k (low-rank predictors have both)")
    if rank_k and block_size:
        raise ValueError("low-rank predictors cannot also be block-diagonal")
    rng = np.random.default_rng(seed)
    c = n_kv_heads * head_dim
    rank_v = rank_v or rank_k
    mask = np.ones((c, c), dtype=np.float32)
    if block_size:
        blocks = np.arange(c) // block_size
        mask = (blocks[:, None] == blocks[None, :]).astype(np.float32)

    def normal(std: float, shape: tuple[int, ...]) -> np.ndarray:
        return rng.normal(0, std, shape).astype(np.float32)

    def pred() -> LayerPredictor:
        if rank_k:
            f16 = lambda a: a.astype(np.float16).astype(np.float32)
            factors = LowRankFactors(k_down=f16(normal(scale, (rank_k, c))), k_up=f16(normal(c ** -0.5, (c, rank_k))),
                                     v_down_k=f16(normal(scale, (rank_v, c))), v_down_v=f16(normal(scale, (rank_v, c))),
                                     v_up=f16(normal(c ** -0.5, (c, rank_v))))
            return LayerPredictor.from_factors(factors, k_bias=normal(scale, (c,)), v_bias=normal(scale, (c,)))
        arrays = [normal(scale, shape) for shape in ((c, c), (c,), (c, c), (c, c), (c,))]
        for i in (0, 2, 3):
            arrays[i] *= mask
        return LayerPredictor(*arrays)

    return AquaKVParams(grid=gaussian_grid(n_points), grid0=gaussian_grid(n_points0),
                        group_size=choose_group_size(c, head_dim), prefix_tokens=4, recent_tokens=128,
                        n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim,
                        predictors=[None] + [pred() for _ in range(n_layers - 1)],
                        channel_order="llama.cpp", calibration={"source": "random test predictors"},
                        predictor_block_size=block_size, predictor_form="lowrank" if rank_k else "dense",
                        predictor_rank_k=rank_k, predictor_rank_v=rank_v, predictor_value_input=value_input)
