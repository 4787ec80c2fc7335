"""Bad input to the bindings gives clear Python exceptions, never a crash."""

from __future__ import annotations

import pytest

from aquakv_gguf.runtime import ContextFullError, LlamaError, Model, SamplingParams
from aquakv_gguf.runtime.model import format_kv_overrides

from aquakv_gguf.testing.gpu import test_n_gpu_layers

NGL = test_n_gpu_layers()


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        Model(tmp_path / "missing.gguf")


def test_not_a_gguf_carries_the_llama_log(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(LlamaError) as err:
        Model(bad)
    assert "could not load" in str(err.value)
    assert err.value.log.strip(), "the llama.cpp log lines must be attached"


def test_truncated_gguf(tiny_llama_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = tiny_llama_gguf.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LlamaError):
        Model(cut)


def test_kv_overrides_are_applied_and_validated(tiny_llama_gguf):
    assert format_kv_overrides({"a.b": False, "c": 3, "d": 0.5, "e": "x"}) == \
        "a.b=bool:false\nc=int:3\nd=float:0.5\ne=str:x"
    with pytest.raises(ValueError):
        format_kv_overrides({"a\nb": 1})
    with pytest.raises(TypeError):
        format_kv_overrides({"a": [1]})
    with Model(tiny_llama_gguf) as model:
        trained = model.n_ctx_train
    with Model(tiny_llama_gguf, kv_overrides={"llama.context_length": 1234}) as model:
        assert trained != 1234 and model.n_ctx_train == 1234


def test_malformed_override_reaching_c_is_refused_with_reason(tiny_llama_gguf):
    from aquakv_gguf.runtime._ffi import ffi, lib
    from aquakv_gguf.runtime.model import log_tail
    L = lib()
    L.aquakv_log_clear()
    for bad, reason in ((b"no_equals_sign", b"expected key=type:value"), (b"k=int:12x", b"not a number"),
                        (b"k=bool:yes", b"true or false"), (b"k=blob:1", b"type must be")):
        handle = L.aquakv_model_load(str(tiny_llama_gguf).encode(), 0, True, False, bad)
        assert handle == ffi.NULL
        assert reason.decode() in log_tail()


def test_context_errors(tiny_model):
    with pytest.raises(ValueError, match="unknown cache type"):
        tiny_model.context(type_k="q9_9")
    with tiny_model.context(n_ctx=256, n_batch=64) as ctx:
        with pytest.raises(ValueError, match="out of range"):
            ctx.decode([tiny_model.n_vocab + 5])
        with pytest.raises(ValueError, match="exceeds n_batch"):
            ctx.decode_batch([1] * 65, range(65), [0] * 65, [False] * 65)
        ctx.decode([1] * 200, logits="none")
        with pytest.raises(ContextFullError):
            ctx.decode([1] * 64, logits="none")
    with pytest.raises(LlamaError, match="closed"):
        ctx.decode([1])


def test_closing_model_closes_its_contexts(tiny_llama_gguf):
    model = Model(tiny_llama_gguf, n_gpu_layers=NGL)
    ctx = model.context(n_ctx=128)
    model.close()
    with pytest.raises(LlamaError, match="closed"):
        ctx.decode([1])
    with pytest.raises(LlamaError, match="closed"):
        model.n_layer


def test_generation_greedy_is_deterministic_and_sampling_is_seeded(tiny_model):
    def run(params):
        with tiny_model.context(n_ctx=256) as ctx:
            return [s.token for s in ctx.generate([1, 2, 3], max_tokens=12, sampling=params, stop_at_eog=False)]
    assert run(SamplingParams()) == run(SamplingParams())
    assert len(run(SamplingParams())) == 12
    a = run(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=7))
    assert a == run(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=7))
    assert a != run(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=8))
