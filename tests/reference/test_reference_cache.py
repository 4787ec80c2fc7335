"""The torch AQUA-KV reference cache: exact pass-through, token policy, chained reconstruction."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from aquakv_gguf.calibrate import RowQuantizer, calibrate, key_value_modules, make_sequences, recipe_for_hf_config
from aquakv_gguf.calibrate.quantizer import key_quantizer
from aquakv_gguf.eval.reference_eval import forward_with_cache, stepwise_logits
from aquakv_gguf.reference import AquaKVCache, bits_per_value, quantized_end
from aquakv_gguf.reference.semantics import (
    predict_keys,
    predict_keys_lowrank,
    predict_values,
    predict_values_lowrank,
)

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be. ") * 40


def load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(folder)))


def ids_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2000, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def calibrated(tiny_hf_factory):
    """A 3-layer tiny Llama and AQUA-KV 2-bit params calibrated on it (Hugging Face order)."""
    model, tok = load(tiny_hf_factory("llama", n_layers=3))
    recipe = recipe_for_hf_config(model.config)
    seqs = make_sequences(tok, TEXT, n_tokens=2048, seq_len=256, heldout_fraction=0.25, seed=0)
    res = calibrate(model, recipe, seqs.input_ids, seqs.heldout, bits=(2,), progress=False)
    return model, res.params[2]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_quantization_off_reproduces_plain_transformers(tiny_hf_factory, arch: str) -> None:
    """32-token steps through the pre-RoPE cache give the logits of one plain pass."""
    model, _ = load(tiny_hf_factory(arch, n_layers=2))
    ids = ids_of(200)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    got = stepwise_logits(model, ids, AquaKVCache(model, mode="off"), step=32)
    torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-4)
    f16 = stepwise_logits(model, ids, AquaKVCache(model, mode="f16"), step=32)
    assert 0 < (f16 - plain).abs().max().item() < 5e-2


def test_token_policy() -> None:
    assert [quantized_end(n, 4, 128) for n in (0, 3, 4, 100, 131, 132, 133, 259, 260, 300)] == \
        [4, 4, 4, 4, 4, 132, 132, 132, 260, 260]


def test_sinks_and_window_stay_f16_and_chunks_are_quantized(calibrated) -> None:
    model, params = calibrated
    cache = AquaKVCache(model, mode="aqua", params=params)
    stepwise_logits(model, ids_of(300), cache, step=32)
    raw_k = {}
    for layer in cache.layers:
        assert layer.q_end == 260 and layer.n_tokens == 300 and layer.raw_k.shape[1] == 40
        raw_k[layer.layer_idx] = layer.raw_k
        # The window holds the exact values rounded to f16.
        assert torch.equal(layer.k_hat[:, 260:], layer.raw_k.half().float())
        assert torch.equal(layer.k_hat[:, :4], layer.k_hat[:, :4].half().float())
    assert cache.get_seq_length() == 300


def test_layer0_reconstruction_does_not_depend_on_step_size(calibrated) -> None:
    model, params = calibrated
    ids = ids_of(160, seed=1)
    states = []
    for step in (160, 32, 13):
        cache = AquaKVCache(model, mode="aqua", params=params)
        stepwise_logits(model, ids, cache, step=step)
        states.append(cache.layers[0])
    for other in states[1:]:
        assert other.q_end == states[0].q_end
        # Layer 0's keys do not depend on attention, so only the batching differs: BLAS may
        # round k_proj's output differently per batch shape, which can move an f16 window value by
        # one ulp (or, very rarely, a quantized pair across a cell boundary).
        for name in ("k_hat", "v_hat"):
            a, b = getattr(other, name)[0], getattr(states[0], name)[0]
            torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-3)
            same_rows = torch.isclose(a[4:132], b[4:132], rtol=1e-5, atol=1e-5).all(dim=1)
            assert same_rows.float().mean().item() > 0.99


def assert_cache_follows_chain(model, params, seed: int, predict_k, predict_v) -> None:
    """Run 140 tokens through an AQUA-KV cache and recompute its quantized chunk (positions 4..131) by hand.

    predict_k(t, k_hat_prev) -> p and predict_v(t, k_hat, v_hat_prev) -> q, with ``t`` the layer's
    arrays as tensors (``LayerPredictor.arrays()``): k̂_l = p + Q(k_l − p), v̂_l = q + Q(v_l − q).
    """
    recipe = recipe_for_hf_config(model.config)
    raw: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for i, (km, vm) in enumerate(key_value_modules(model, recipe)):
        for name, mod in (("k", km), ("v", vm)):
            handles.append(mod.register_forward_hook(
                lambda _m, _i, out, i=i, name=name: raw.setdefault(i, {}).__setitem__(name, out.reshape(1, out.shape[1], -1))))
    cache = AquaKVCache(model, mode="aqua", params=params)
    try:
        with torch.no_grad():
            forward_with_cache(model, ids_of(140, seed=seed), cache)
    finally:
        for h in handles:
            h.remove()
    rows = slice(4, 132)
    # the cache quantizes what its f16 window holds, keys in llama.cpp's channel order
    raw = {i: {n: x.half().float() for n, x in d.items()} for i, d in raw.items()}
    q0, q = RowQuantizer(params.grid0, params.group_size), RowQuantizer(params.grid, params.group_size)
    q0k, qk = (key_quantizer(x, params.n_kv_heads, params.head_dim, recipe.llama_cpp_permutes_qk) for x in (q0, q))
    k_prev, v_prev = q0k(raw[0]["k"][:, rows]), q0(raw[0]["v"][:, rows])
    torch.testing.assert_close(cache.layers[0].k_hat[:, rows], k_prev)
    for layer in (1, 2):
        t = {n: torch.from_numpy(a) for n, a in params.predictors[layer].arrays().items()}
        p = predict_k(t, k_prev)
        k_hat = p + qk(raw[layer]["k"][:, rows] - p)
        qv = predict_v(t, k_hat, v_prev)
        v_hat = qv + q(raw[layer]["v"][:, rows] - qv)
        torch.testing.assert_close(cache.layers[layer].k_hat[:, rows], k_hat, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache.layers[layer].v_hat[:, rows], v_hat, rtol=1e-4, atol=1e-4)
        k_prev, v_prev = k_hat, v_hat


def test_reconstruction_follows_the_chain(calibrated) -> None:
    """k̂_l = p + Q(k_l − p) with p from the *previous layer's reconstruction*, as in calibration."""
    model, params = calibrated
    assert_cache_follows_chain(
        model, params, 2, lambda t, k_prev: predict_keys(k_prev, t["k_weight"], t["k_bias"]),
        lambda t, k_hat, v_prev: predict_values(k_hat, v_prev, t["v_weight_k"], t["v_weight_v"], t["v_bias"]))


def test_params_in_llama_cpp_order_give_the_same_cache(calibrated) -> None:
    model, params = calibrated
    ids = ids_of(200, seed=4)
    a = stepwise_logits(model, ids, AquaKVCache(model, mode="aqua", params=params), step=32)
    lp = params.with_channel_order("llama.cpp", permutes_qk=True)
    b = stepwise_logits(model, ids, AquaKVCache(model, mode="aqua", params=lp), step=32)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        AquaKVCache(torch.nn.Linear(1, 1), mode="bogus")  # type: ignore[arg-type]


def test_bits_per_value_accounting() -> None:
    common = dict(n_layers=30, n_channels=192, prefix_tokens=4, recent_tokens=128)
    assert bits_per_value(8192, group_size=192, n_points=0, n_points0=None, **common) == 16.0
    # 8192 tokens: 8064 quantized, 128 in f16 (4 sinks + 124 recent); 2-bit codes + 3 f16 scales.
    q = 96 * 4 + 3 * 16
    q0 = 96 * 8 + 3 * 16
    f16 = 192 * 16
    want = (29 * (8064 * q + 128 * f16) + (8064 * q0 + 128 * f16)) / (30 * 192 * 8192)
    got = bits_per_value(8192, group_size=64, n_points=16, n_points0=256, **common)
    assert got == pytest.approx(want)
    assert 2.25 < got < 2.8


def test_rows_with_different_modes_match_separate_caches(calibrated) -> None:
    """One batch whose rows use f16, HIGGS and AQUA-KV equals three single-mode runs."""
    model, params = calibrated
    ids = ids_of(200, seed=5)
    rows = [dict(mode="f16"), dict(mode="higgs", bits=3), dict(mode="aqua", params=params)]
    batched = stepwise_logits(model, ids.expand(3, -1), AquaKVCache(model, rows=rows), step=32)
    for i, row in enumerate(rows):
        alone = stepwise_logits(model, ids, AquaKVCache(model, **row), step=32)
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def calibrated_lowrank(tiny_hf_factory):
    """The tiny Llama of ``calibrated`` with low-rank (keys 16, values 24) 2-bit params (Hugging Face order)."""
    model, tok = load(tiny_hf_factory("llama", n_layers=3))
    recipe = recipe_for_hf_config(model.config)
    seqs = make_sequences(tok, TEXT, n_tokens=2048, seq_len=256, heldout_fraction=0.25, seed=0)
    res = calibrate(model, recipe, seqs.input_ids, seqs.heldout, bits=(2,), predictor_form="lowrank", rank_k=16,
                    rank_v=24, progress=False)
    return model, res.params[2]


def test_lowrank_cache_matches_dense_cache_with_the_products(calibrated_lowrank) -> None:
    """Factors in the format's order vs dense weights W = U·D: the same maths, so near-identical logits."""
    model, params = calibrated_lowrank
    dense = dataclasses.replace(params, predictor_form="dense", predictor_rank_k=0, predictor_rank_v=0,
                                predictors=[None if p is None else dataclasses.replace(p, factors=None)
                                            for p in params.predictors])
    ids = ids_of(300, seed=6)
    a = stepwise_logits(model, ids, AquaKVCache(model, mode="aqua", params=params), step=32)
    b = stepwise_logits(model, ids, AquaKVCache(model, mode="aqua", params=dense), step=32)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    lp = params.with_channel_order("llama.cpp", permutes_qk=True)
    c = stepwise_logits(model, ids, AquaKVCache(model, mode="aqua", params=lp), step=32)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_lowrank_reconstruction_uses_the_factors_in_order(calibrated_lowrank) -> None:
    """k̂_l = p + Q(k_l − p) with p = U_k (D_k k̂_{l-1}) + a (and the value analogue), chained."""
    model, params = calibrated_lowrank
    assert_cache_follows_chain(
        model, params, 7, lambda t, k_prev: predict_keys_lowrank(k_prev, t["k_down"], t["k_up"], t["k_bias"]),
        lambda t, k_hat, v_prev: predict_values_lowrank(k_hat, v_prev, t["v_down_k"], t["v_down_v"], t["v_up"],
                                                        t["v_bias"]))
