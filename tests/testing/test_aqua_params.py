"""Random AQUA-KV parameters for tests: dense, block-diagonal and low-rank shapes that the writer accepts."""

from __future__ import annotations

import numpy as np
import pytest

from aquakv_gguf.gguf_io.writer import check_params
from aquakv_gguf.testing.aqua_params import random_aquakv_params


def test_lowrank_random_params_have_f16_factors_of_the_ranks() -> None:
    params = random_aquakv_params(3, 2, 64, seed=2, rank_k=8, rank_v=32)
    check_params(params)
    assert (params.predictor_form, params.predictor_rank_k, params.predictor_rank_v) == ("lowrank", 8, 32)
    assert params.channel_order == "llama.cpp" and params.predictors[0] is None
    for pred in params.predictors[1:]:
        f = pred.factors
        assert f.k_down.shape == (8, 128) and f.k_up.shape == (128, 8) and f.v_up.shape == (128, 32)
        for name, arr in f.arrays().items():
            np.testing.assert_array_equal(arr.astype(np.float16).astype(np.float32), arr, err_msg=name)
        np.testing.assert_array_equal(pred.v_weight_v, (f.v_up.astype(np.float64) @ f.v_down_v).astype(np.float32))
        # not larger than a dense predictor of the same scale (the chain stays bounded)
        assert np.linalg.norm(pred.k_weight, 2) < 2 * 0.05 * (2 * np.sqrt(128))
    same = random_aquakv_params(3, 2, 64, seed=2, rank_k=16)
    assert same.predictor_rank_v == 16 and same.predictors[1].factors.v_up.shape == (128, 16)


def test_dense_random_params_are_unchanged_by_the_low_rank_option() -> None:
    """Native tests rely on the seeded dense draws: the option must not consume random numbers when off."""
    params = random_aquakv_params(2, 2, 64, seed=1)
    assert params.predictor_form == "dense" and params.predictors[1].factors is None
    rng = np.random.default_rng(1)
    np.testing.assert_array_equal(params.predictors[1].k_weight, rng.normal(0, 0.05, (128, 128)).astype(np.float32))
    with pytest.raises(ValueError, match="rank_v needs rank_k"):
        random_aquakv_params(2, 2, 64, rank_v=8)
    with pytest.raises(ValueError, match="block-diagonal"):
        random_aquakv_params(2, 2, 64, rank_k=8, block_size=64)
