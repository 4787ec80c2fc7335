"""Layer-by-layer capture of pre-RoPE K/V and the chained predictor fit on tiny random models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aquakv_gguf import quant
from aquakv_gguf.calibrate import (
    CalibrationTextError,
    LayerwiseRunner,
    RowQuantizer,
    calibrate,
    key_value_modules,
    make_sequences,
    recipe_for_hf_config,
)
from aquakv_gguf.calibrate.quantizer import key_quantizer
from aquakv_gguf.calibrate.ridge import fit_ridge
from aquakv_gguf.reference.semantics import predict_keys, predict_values

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. ") * 60


def load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(folder)))


def full_forward_kv(model, recipe, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """K/V of every layer from hooks during one ordinary forward: ``[(k, v)]``, each ``[B*T, C]``."""
    got: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for i, (km, vm) in enumerate(key_value_modules(model, recipe)):
        for name, mod in (("k", km), ("v", vm)):
            handles.append(mod.register_forward_hook(
                lambda _m, _i, out, i=i, name=name: got.setdefault(i, {}).__setitem__(name, out)))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    c = lambda t: t.reshape(t.shape[0] * t.shape[1], -1)
    return [(c(got[i]["k"]), c(got[i]["v"])) for i in range(len(got))]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_layerwise_capture_equals_an_ordinary_forward(tiny_hf_factory, arch: str) -> None:
    model, _ = load(tiny_hf_factory(arch, n_layers=3))
    recipe = recipe_for_hf_config(model.config)
    ids = torch.randint(0, 1000, (5, 40), generator=torch.Generator().manual_seed(0))
    want = full_forward_kv(model, recipe, ids)
    runner = LayerwiseRunner(model, recipe, ids, batch_size=2)
    for layer in range(3):
        k, v = runner.next_layer()
        torch.testing.assert_close(k, want[layer][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, want[layer][1], rtol=1e-5, atol=1e-5)
    if arch == "qwen3":
        # The key module is k_norm: its output, not k_proj's, is what RoPE sees.
        assert recipe.key.endswith("k_norm")


def test_sequences_split_and_errors(tiny_llama_hf: Path) -> None:
    _, tok = load(tiny_llama_hf)
    seqs = make_sequences(tok, TEXT, n_tokens=512, seq_len=64, heldout_fraction=0.25, seed=3)
    assert seqs.input_ids.shape == (8, 64) and int(seqs.heldout.sum()) == 2
    again = make_sequences(tok, TEXT, n_tokens=512, seq_len=64, heldout_fraction=0.25, seed=3)
    assert torch.equal(seqs.heldout, again.heldout) and torch.equal(seqs.input_ids, again.input_ids)
    with pytest.raises(CalibrationTextError, match="empty"):
        make_sequences(tok, "  \n ", n_tokens=512, seq_len=64, heldout_fraction=0.25, seed=0)
    with pytest.raises(CalibrationTextError, match="too short"):
        make_sequences(tok, "Hello there.", n_tokens=512, seq_len=64, heldout_fraction=0.25, seed=0)
    with pytest.raises(CalibrationTextError, match="too short"):
        make_sequences(tok, TEXT, n_tokens=512, seq_len=64, heldout_fraction=0.25, seed=0, min_train_tokens=10**6)


def test_chain_inputs_are_reconstructions(tiny_hf_factory) -> None:
    """Refitting each layer from an independent re-implementation of the chain gives the same predictors."""
    model, tok = load(tiny_hf_factory("llama", n_layers=3))
    recipe = recipe_for_hf_config(model.config)
    seqs = make_sequences(tok, TEXT * 3, n_tokens=2048, seq_len=128, heldout_fraction=0.25, seed=0)
    res = calibrate(model, recipe, seqs.input_ids, seqs.heldout, bits=(2,), progress=False)
    params = res.params[2]
    assert params.channel_order == "hf" and params.predictors[0] is None
    assert len(res.reports[2]) == 3 and res.reports[2][0].k_pred == 1.0
    for r in res.reports[2][1:]:
        assert 0 < r.k_pred < 1.5 and 0 < r.v_pred < 1.5 and 0 < r.k < r.k_pred
        # Quantizing the residual of a useful prediction beats quantizing the keys themselves.
        assert r.k < r.k_higgs and r.v < r.v_higgs

    # Independent chain: original K/V from one ordinary forward, rows of sinks excluded from the fit.
    kv = full_forward_kv(model, recipe, seqs.input_ids)
    pos = torch.arange(128).repeat(seqs.input_ids.shape[0])
    train = (pos >= 4) & ~seqs.heldout.repeat_interleave(128)
    q0 = RowQuantizer(params.grid0, params.group_size)
    q = RowQuantizer(params.grid, params.group_size)
    # keys are quantized in llama.cpp's channel order (the native cache's), values as they are
    q0k, qk = (key_quantizer(x, 2, 64, recipe.llama_cpp_permutes_qk) for x in (q0, q))
    k_prev, v_prev = q0k(kv[0][0]), q0(kv[0][1])
    for layer in (1, 2):
        k, v = kv[layer]
        pred = params.predictors[layer]
        a_w, a_b = fit_ridge(k_prev[train], k[train], reg=recipe.reg)
        np.testing.assert_allclose(a_w.half().float().numpy(), pred.k_weight, atol=2e-3, rtol=1e-2)
        np.testing.assert_allclose(a_b.numpy(), pred.k_bias, atol=1e-3, rtol=1e-3)
        t = {n: torch.from_numpy(getattr(pred, n)) for n in ("k_weight", "k_bias", "v_weight_k", "v_weight_v", "v_bias")}
        p = predict_keys(k_prev, t["k_weight"], t["k_bias"])
        k_hat = p + qk(k - p)
        b_w, _b_b = fit_ridge(torch.cat([k_hat, v_prev], 1)[train], v[train], reg=recipe.reg)
        np.testing.assert_allclose(b_w[:, :128].half().float().numpy(), pred.v_weight_k, atol=2e-3, rtol=1e-2)
        np.testing.assert_allclose(b_w[:, 128:].half().float().numpy(), pred.v_weight_v, atol=2e-3, rtol=1e-2)
        qv = predict_values(k_hat, v_prev, t["v_weight_k"], t["v_weight_v"], t["v_bias"])
        v_hat = qv + q(v - qv)
        k_prev, v_prev = k_hat, v_hat

    # A chain fed the originals instead of the reconstructions would fit a different layer 1.
    a_orig, _ = fit_ridge(kv[0][0][train], kv[1][0][train], reg=recipe.reg)
    assert not np.allclose(a_orig.half().float().numpy(), params.predictors[1].k_weight, atol=2e-3, rtol=1e-2)


def test_group_size_default_follows_the_quant_rule(tiny_llama_hf: Path) -> None:
    model, tok = load(tiny_llama_hf)
    recipe = recipe_for_hf_config(model.config)
    seqs = make_sequences(tok, TEXT * 3, n_tokens=1024, seq_len=128, heldout_fraction=0.25, seed=0)
    res = calibrate(model, recipe, seqs.input_ids, seqs.heldout, bits=(2, 3), progress=False)
    assert set(res.params) == {2, 3}
    assert res.params[2].group_size == quant.choose_group_size(128, 64) == 128
    assert res.params[3].grid.shape == (64, 2) and res.params[3].grid0.shape == (256, 2)
    # Layer 0 has no predictor and is the same for every bit width.
    assert res.reports[2][0].k == res.reports[3][0].k
    assert res.peak_rss_mib > 0 and res.train_tokens > 0 and res.heldout_tokens > 0


def test_runner_drops_sink_rows_and_stops_the_last_layer_early(tiny_llama_hf: Path) -> None:
    model, _ = load(tiny_llama_hf)
    recipe = recipe_for_hf_config(model.config)
    ids = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(1))
    want = full_forward_kv(model, recipe, ids)
    runner = LayerwiseRunner(model, recipe, ids, batch_size=2, skip_prefix=4)
    calls = []
    last = model.model.layers[-1]
    handle = last.mlp.register_forward_hook(lambda *_: calls.append(1))
    try:
        for layer in range(len(want)):
            k, v = runner.next_layer()
            keep = (torch.arange(24) >= 4).repeat(3)
            torch.testing.assert_close(k, want[layer][0][keep], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, want[layer][1][keep], rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()
    assert not calls, "the last layer's MLP ran although only its K/V are needed"


def test_block_diagonal_predictors(tiny_hf_factory) -> None:
    """N = head_dim: every weight block-diagonal (exact zeros) in both channel orders, blocks fitted alone."""
    from aquakv_gguf.calibrate.chain import check_predictor_block
    from aquakv_gguf.gguf_io.params import llama_cpp_key_permutation, off_block_max

    model, tok = load(tiny_hf_factory("llama", n_layers=3))
    recipe = recipe_for_hf_config(model.config)
    seqs = make_sequences(tok, TEXT * 3, n_tokens=2048, seq_len=128, heldout_fraction=0.25, seed=0)
    res = calibrate(model, recipe, seqs.input_ids, seqs.heldout, bits=(2,), predictor_block=64, progress=False)
    params = res.params[2]
    assert params.predictor_block_size == 64
    # llama.cpp's key permutation stays inside each head, so per-head blocks survive it.
    perm = llama_cpp_key_permutation(2, 64)
    assert all(set(perm[h * 64:(h + 1) * 64]) == set(range(h * 64, (h + 1) * 64)) for h in range(2))
    for order in ("hf", "llama.cpp"):
        p = params.with_channel_order(order, permutes_qk=recipe.llama_cpp_permutes_qk)
        assert p.predictor_block_size == 64
        for pred in p.predictors[1:]:
            for name in ("k_weight", "v_weight_k", "v_weight_v"):
                w = getattr(pred, name)
                assert off_block_max(w, 64) == 0.0 and np.abs(w[:64, :64]).max() > 0, (order, name)
    for r in res.reports[2][1:]:
        assert 0 < r.k < r.k_higgs and 0 < r.v < r.v_higgs

    # Layer 1's key predictor: each block is the ridge fit of that head's keys on that head's k̂_0 alone.
    kv = full_forward_kv(model, recipe, seqs.input_ids)
    pos = torch.arange(128).repeat(seqs.input_ids.shape[0])
    train = (pos >= 4) & ~seqs.heldout.repeat_interleave(128)
    k_prev = key_quantizer(RowQuantizer(params.grid0, params.group_size), 2, 64, True)(kv[0][0])
    for h in range(2):
        s = slice(h * 64, (h + 1) * 64)
        a_w, a_b = fit_ridge(k_prev[train][:, s], kv[1][0][train][:, s], reg=recipe.reg)
        np.testing.assert_allclose(a_w.half().float().numpy(), params.predictors[1].k_weight[s, s], atol=2e-3, rtol=1e-2)
        np.testing.assert_allclose(a_b.numpy(), params.predictors[1].k_bias[s], atol=1e-3, rtol=1e-3)

    assert check_predictor_block(None, 2, 64, True) == check_predictor_block(128, 2, 64, True) == 128
    with pytest.raises(ValueError, match="multiple of head_dim"):
        check_predictor_block(32, 2, 64, True)
    assert check_predictor_block(32, 2, 64, False) == 32
    with pytest.raises(ValueError, match="divide"):
        check_predictor_block(48, 2, 64, False)


def test_lowrank_predictors(tiny_hf_factory) -> None:
    """Reduced-rank fits: factor shapes, f16 factors, the chain predicts with them in the format's order;
    rank C matches dense, rank 8 is worse."""
    from aquakv_gguf.calibrate.ridge import ErrorAccumulator
    from aquakv_gguf.reference.semantics import predict_keys_lowrank, predict_values_lowrank

    model, tok = load(tiny_hf_factory("llama", n_layers=3))
    recipe = recipe_for_hf_config(model.config)
    seqs = make_sequences(tok, TEXT * 3, n_tokens=2048, seq_len=128, heldout_fraction=0.25, seed=0)
    fit = lambda **kw: calibrate(model, recipe, seqs.input_ids, seqs.heldout, bits=(2,), progress=False, **kw)
    dense = fit().reports[2]
    full = fit(predictor_form="lowrank", rank_k=128, rank_v=128).reports[2]
    res = fit(predictor_form="lowrank", rank_k=8, rank_v=16)
    params, low = res.params[2], res.reports[2]
    assert (params.predictor_form, params.predictor_rank_k, params.predictor_rank_v) == ("lowrank", 8, 16)
    assert params.predictor_block_size == 0 and params.predictors[0] is None
    for pred in params.predictors[1:]:
        f = pred.factors
        assert f.k_down.shape == (8, 128) and f.k_up.shape == (128, 8)
        assert f.v_down_k.shape == f.v_down_v.shape == (16, 128) and f.v_up.shape == (128, 16)
        for name, arr in f.arrays().items():
            # rounded to the stored f16 before the chain used them
            np.testing.assert_array_equal(arr.astype(np.float16).astype(np.float32), arr, err_msg=name)
        np.testing.assert_allclose(pred.k_weight, f.k_up.astype(np.float64) @ f.k_down, rtol=1e-5, atol=1e-6)

    mean = lambda reps, key: float(np.mean([getattr(r, key) for r in reps[1:]]))
    for key in ("k_pred", "v_pred", "k", "v"):
        # rank C is the ridge fit itself (U orthogonal: U Uᵀ W = W), up to the f16 rounding of two factors
        assert mean(full, key) == pytest.approx(mean(dense, key), rel=0.03), key
        assert mean(low, key) > 1.2 * mean(dense, key), key

    # Independent chain with the written factors, in the format's order: the same held-out errors as reported.
    kv = full_forward_kv(model, recipe, seqs.input_ids)
    pos = torch.arange(128).repeat(seqs.input_ids.shape[0])
    held_tok = seqs.heldout.repeat_interleave(128)
    train, held = (pos >= 4) & ~held_tok, (pos >= 4) & held_tok
    q0, q = RowQuantizer(params.grid0, params.group_size), RowQuantizer(params.grid, params.group_size)
    q0k, qk = (key_quantizer(x, 2, 64, recipe.llama_cpp_permutes_qk) for x in (q0, q))
    k_prev, v_prev = q0k(kv[0][0]), q0(kv[0][1])

    def rel(y: torch.Tensor, y_hat: torch.Tensor) -> float:
        acc = ErrorAccumulator()
        acc.add(y[held], y_hat[held])
        return acc.rel

    for layer in (1, 2):
        k, v = kv[layer]
        pred = params.predictors[layer]
        t = {n: torch.from_numpy(a) for n, a in pred.arrays().items()}
        # the bias centres the rounded factors' predictions on the training rows
        want_b = k[train].double().mean(0) - t["k_up"].double() @ (t["k_down"].double() @ k_prev[train].double().mean(0))
        np.testing.assert_allclose(pred.k_bias, want_b.numpy(), atol=2e-4, rtol=1e-3)
        p = predict_keys_lowrank(k_prev, t["k_down"], t["k_up"], t["k_bias"])
        assert rel(k, p) == pytest.approx(low[layer].k_pred, rel=1e-4)
        k_hat = p + qk(k - p)
        qv = predict_values_lowrank(k_hat, v_prev, t["v_down_k"], t["v_down_v"], t["v_up"], t["v_bias"])
        assert rel(v, qv) == pytest.approx(low[layer].v_pred, rel=1e-4)
        v_hat = qv + q(v - qv)
        assert rel(k, k_hat) == pytest.approx(low[layer].k, rel=1e-3)
        assert rel(v, v_hat) == pytest.approx(low[layer].v, rel=1e-3)
        k_prev, v_prev = k_hat, v_hat

    with pytest.raises(ValueError, match="cannot also be block-diagonal"):
        fit(predictor_form="lowrank", rank_k=8, rank_v=8, predictor_block=64)
    with pytest.raises(ValueError, match=r"rank_v 129 must be in \[1, C = 128\]"):
        fit(predictor_form="lowrank", rank_k=8, rank_v=129)
    with pytest.raises(ValueError, match="unknown predictor form"):
        fit(predictor_form="sparse")
