"""Random AQUA-KV parameters of the right shapes, for tests that need a model.aqua.gguf fast."""

from __future__ import annotations

import numpy as np

from aquakv_gguf.gguf_io import AquaKVParams, LayerPredictor
from aquakv_gguf.quant import choose_group_size, gaussian_grid


def random_aquakv_params(n_layers: int, n_kv_heads: int, head_dim: int, *, seed: int = 0, n_points: int = 16,
                         n_points0: int = 256, scale: float = 0.05, block_size: int = 0) -> AquaKVParams:
    """Predictors drawn from N(0, scale²), in llama.cpp channel order; Gaussian grids of the given sizes.

    block_size N > 0 keeps only the diagonal [N, N] blocks of every weight (block-diagonal predictors).
    """
    rng = np.random.default_rng(seed)
    c = n_kv_heads * head_dim
    mask = np.ones((c, c), dtype=np.float32)
    if block_size:
        blocks = np.arange(c) // block_size
        mask = (blocks[:, None] == blocks[None, :]).astype(np.float32)

    def pred() -> LayerPredictor:
        arrays = [rng.normal(0, scale, shape).astype(np.float32) for shape in ((c, c), (c,), (c, c), (c, c), (c,))]
        for i in (0, 2, 3):
            arrays[i] *= mask
        return LayerPredictor(*arrays)

    return AquaKVParams(grid=gaussian_grid(n_points), grid0=gaussian_grid(n_points0),
                        group_size=choose_group_size(c, head_dim), prefix_tokens=4, recent_tokens=128,
                        n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim,
                        predictors=[None] + [pred() for _ in range(n_layers - 1)],
                        channel_order="llama.cpp", calibration={"source": "random test predictors"},
                        predictor_block_size=block_size)
