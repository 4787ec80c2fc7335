"""The synthetic-shape GGUF writer used by the GPU benchmark: its files load and run in llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from aquakv_gguf.eval.native_perplexity import window_logits
from aquakv_gguf.gguf_io import names, read_aqua_gguf
from aquakv_gguf.runtime import Model, log_tail
from aquakv_gguf.testing.aqua_params import random_aquakv_params
from aquakv_gguf.testing.gpu import test_n_gpu_layers
from aquakv_gguf.testing.synth_gguf import SHAPES, synthetic_aquakv_params, write_synthetic_llama

SHAPE = SHAPES["tiny"]


@pytest.mark.parametrize("weights", ["q4_0", "q8_0"])
def test_synthetic_model_has_the_shapes_and_runs_with_and_without_aquakv(weights, tmp_path):
    params = random_aquakv_params(SHAPE.n_layer, SHAPE.n_head_kv, SHAPE.head_dim, seed=1, scale=0.03)
    path = write_synthetic_llama(tmp_path / "m.aqua.gguf", SHAPE, weights=weights, aquakv=params, progress=False)
    assert not list(tmp_path.glob("*.tmp"))
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    assert tensors["blk.1.attn_k.weight"].tensor_type.name == weights.upper()
    assert list(tensors["blk.1.attn_k.weight"].shape) == [SHAPE.n_embd, SHAPE.n_kv_channels]
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [SHAPE.n_ff, SHAPE.n_embd]
    assert read_aqua_gguf(path).n_layers == SHAPE.n_layer

    tokens = list(map(int, np.random.default_rng(0).integers(300, SHAPE.n_vocab, size=192)))
    out = {}
    for aquakv in (True, False):
        with Model(path, n_gpu_layers=test_n_gpu_layers(), aquakv=aquakv) as model, model.context(n_ctx=256) as ctx:
            assert (ctx.cache_info() is not None) == aquakv
            out[aquakv] = window_logits(ctx, tokens, 32)
    assert out[True].shape == (len(tokens), SHAPE.n_vocab) and np.isfinite(out[True]).all()
    assert out[True].std() > 0.01, "random weights must give non-degenerate logits"
    assert 0 < np.abs(out[True] - out[False]).max(), "the AQUA-KV cache must change the logits a little"


def test_lowrank_synthetic_model_loads_and_runs(tmp_path):
    """The low-rank form (bench_gpu_cache's aqua2-lr: ranks 32 for keys, 64 for values): factors and
    ranks in the file instead of dense weights, the native loader takes the form, and the model
    runs with finite logits that the AQUA-KV cache changes a little."""
    params = synthetic_aquakv_params(SHAPE, rank_k=32, rank_v=64)
    path = write_synthetic_llama(tmp_path / "lr.aqua.gguf", SHAPE, aquakv=params, progress=False)
    read = read_aqua_gguf(path)
    assert (read.predictor_form, read.predictor_rank_k, read.predictor_rank_v) == (names.FORM_LOWRANK, 32, 64)
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    c = SHAPE.n_kv_channels
    assert list(tensors[names.K_PRED_DOWN.format(layer=1)].shape) == [c, 32]
    assert list(tensors[names.V_PRED_UP.format(layer=1)].shape) == [64, c]
    assert names.K_PRED_WEIGHT.format(layer=1) not in tensors

    tokens = list(map(int, np.random.default_rng(1).integers(300, SHAPE.n_vocab, size=160)))
    out = {}
    for aquakv in (True, False):
        with Model(path, n_gpu_layers=test_n_gpu_layers(), aquakv=aquakv) as model:
            if aquakv:
                assert "low-rank (keys 32, values 64) predictors" in log_tail()
            with model.context(n_ctx=256) as ctx:
                assert (ctx.cache_info() is not None) == aquakv
                out[aquakv] = window_logits(ctx, tokens, 32)
    assert np.isfinite(out[True]).all() and out[True].std() > 0.01
    assert 0 < np.abs(out[True] - out[False]).max(), "the AQUA-KV cache must change the logits a little"


def test_mismatched_aquakv_params_are_refused(tmp_path):
    params = random_aquakv_params(SHAPE.n_layer + 1, SHAPE.n_head_kv, SHAPE.head_dim)
    with pytest.raises(ValueError, match="do not match tiny-shape"):
        write_synthetic_llama(tmp_path / "m.gguf", SHAPE, aquakv=params, progress=False)
    with pytest.raises(ValueError, match="weights must be one of"):
        write_synthetic_llama(tmp_path / "m.gguf", SHAPE, weights="f16", progress=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("block", [0, 32])
def test_a_32_layer_model_fits_the_graph_budget(block, tmp_path):
    """32 layers of AQUA-KV store/read nodes (block-diagonal products add reshapes and permutes)
    must fit llama.cpp's graph object budget: patch 0006 adds aquakv_graph_extra_nodes."""
    from aquakv_gguf.testing.synth_gguf import LlamaShape

    shape = LlamaShape("deep", 32, 256, 4, 4, 64, 512, 1024, tied_embeddings=True, n_ctx_train=4096)
    params = random_aquakv_params(32, 4, 64, seed=1, block_size=block, scale=0.02)
    path = write_synthetic_llama(tmp_path / "deep.gguf", shape, aquakv=params, progress=False)
    with Model(path, n_gpu_layers=test_n_gpu_layers()) as model, \
            model.context(n_ctx=1024, n_batch=512, n_ubatch=512) as ctx:
        out = ctx.decode(list(range(300, 812)), logits="all")
    assert out.shape == (512, shape.n_vocab) and np.isfinite(out).all()
