"""llama.cpp loads model.aqua.gguf files: the AQUA-KV tensors are registered, validated and left alone."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from aquakv_gguf.gguf_io import (
    aquakv_metadata,
    aquakv_tensors,
    open_gguf,
    rewrite,
    write_aqua_gguf,
)
from aquakv_gguf.paths import tool_path
from aquakv_gguf.runtime import LlamaError, Model, log_tail
from aquakv_gguf.testing import random_aquakv_params
from aquakv_gguf.testing.gpu import test_n_gpu_layers

NGL = test_n_gpu_layers()


random_params = random_aquakv_params


@pytest.fixture(scope="module")
def tiny_aqua_gguf(tiny_llama_gguf, tmp_path_factory):
    dims = open_gguf(tiny_llama_gguf)
    from aquakv_gguf.gguf_io import read_model_dims
    d = read_model_dims(dims, tiny_llama_gguf)
    out = tmp_path_factory.mktemp("aqua") / "tiny.aqua.gguf"
    write_aqua_gguf(tiny_llama_gguf, out, random_params(d.n_layers, d.n_kv_heads, d.head_dim), progress=False)
    return out


def decode_logits(path, tokens, **model_kw):
    with Model(path, n_gpu_layers=NGL, **model_kw) as model, model.context(n_ctx=128) as ctx:
        return ctx.decode(tokens, logits="all")


def test_aqua_gguf_loads_and_logs_its_parameters(tiny_llama_gguf, tiny_aqua_gguf):
    with Model(tiny_aqua_gguf, n_gpu_layers=NGL):
        log = log_tail()
    assert "AQUA-KV v1: 16-point grid (layer 0: 256) in R^2, group 128, C = 128" in log


def test_disabled_aquakv_runs_exactly_like_the_plain_model(tiny_llama_gguf, tiny_aqua_gguf):
    tokens = list(range(5, 37))
    plain = decode_logits(tiny_llama_gguf, tokens)
    np.testing.assert_array_equal(decode_logits(tiny_aqua_gguf, tokens, aquakv=False), plain)
    np.testing.assert_array_equal(decode_logits(tiny_aqua_gguf, tokens, kv_overrides={"aquakv.enabled": False}), plain)


def test_plain_gguf_logs_no_aquakv(tiny_llama_gguf):
    with Model(tiny_llama_gguf, n_gpu_layers=NGL):
        assert "AQUA-KV" not in log_tail()


def test_metadata_without_tensors_is_a_missing_tensor_error(tiny_llama_gguf, tmp_path):
    params = random_params(2, 2, 64)
    bad = tmp_path / "meta-only.gguf"
    rewrite(open_gguf(tiny_llama_gguf), bad, add_fields=aquakv_metadata(params), add_tensors={}, progress=False)
    with pytest.raises(LlamaError) as err:
        Model(bad)
    assert "aquakv.grid" in err.value.log


def test_tensors_without_metadata_are_refused(tiny_llama_gguf, tmp_path):
    params = random_params(2, 2, 64)
    bad = tmp_path / "tensors-only.gguf"
    rewrite(open_gguf(tiny_llama_gguf), bad, add_fields=[], add_tensors=aquakv_tensors(params), progress=False)
    with pytest.raises(LlamaError) as err:
        Model(bad)
    assert "no aquakv.version metadata" in err.value.log


def test_predictor_shape_mismatch_is_refused(tiny_llama_gguf, tmp_path):
    params = random_params(2, 1, 64)  # C = 64, but the model has 2 KV heads x 64 = 128
    bad = tmp_path / "wrong-dims.gguf"
    rewrite(open_gguf(tiny_llama_gguf), bad, add_fields=aquakv_metadata(params), add_tensors=aquakv_tensors(params),
            progress=False)
    with pytest.raises(LlamaError) as err:
        Model(bad)
    assert "aquakv_k_pred" in err.value.log and "wrong shape" in err.value.log


def test_llama_quantize_leaves_aquakv_tensors_alone(tiny_aqua_gguf, tmp_path):
    out = tmp_path / "q8.gguf"
    res = subprocess.run([str(tool_path("llama-quantize")), str(tiny_aqua_gguf), str(out), "q8_0"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    before = {t.name: t for t in open_gguf(tiny_aqua_gguf).tensors}
    after = {t.name: t for t in open_gguf(out).tensors}
    assert before.keys() == after.keys()
    aqua = [n for n in after if "aquakv" in n]
    assert len(aqua) == 2 + 5 * 1
    assert all(after[n].ggml_type == before[n].ggml_type for n in aqua)
    assert after["blk.0.attn_q.weight"].ggml_type != before["blk.0.attn_q.weight"].ggml_type  # others quantized
    with Model(out, n_gpu_layers=NGL):
        assert "AQUA-KV v1" in log_tail()
