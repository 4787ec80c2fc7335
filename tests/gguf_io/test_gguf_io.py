"""aquakv.* GGUF writing/reading: byte-identical copy, exact read-back, validation errors, Q/K permutation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValueType

from aquakv_gguf.gguf_io import (
    AquaKVFormatError,
    AquaKVParams,
    aquakv_metadata,
    LayerPredictor,
    llama_cpp_key_permutation,
    names,
    read_aqua_gguf,
    write_aqua_gguf,
)
from aquakv_gguf.gguf_io.rawgguf import RawGGUF

N_LAYERS, N_KV, HEAD_DIM = 2, 2, 64  # the tiny_llama fixture
C = N_KV * HEAD_DIM


def random_params(seed: int = 0, n_layers: int = N_LAYERS, order: str = "llama.cpp") -> AquaKVParams:
    rng = np.random.default_rng(seed)

    def layer() -> LayerPredictor:
        return LayerPredictor(*(rng.standard_normal(s).astype(np.float32) * 0.1
                                for s in [(C, C), (C,), (C, C), (C, C), (C,)]))

    return AquaKVParams(grid=rng.standard_normal((16, 2)).astype(np.float32),
                        grid0=rng.standard_normal((256, 2)).astype(np.float32), group_size=64, prefix_tokens=4,
                        recent_tokens=128, n_layers=n_layers, n_kv_heads=N_KV, head_dim=HEAD_DIM,
                        predictors=[None] + [layer() for _ in range(n_layers - 1)], channel_order=order,
                        calibration={"text": "unit test", "tokens": 1234, "seed": 7,
                                     "k_pred_relmse": [1.0, 0.25], "v_pred_relmse": [1.0, 0.5]})


def written(src: Path, tmp_path_factory: pytest.TempPathFactory, params: AquaKVParams) -> tuple[Path, AquaKVParams]:
    out = tmp_path_factory.mktemp("aqua") / "tiny.aqua.gguf"
    write_aqua_gguf(src, out, params, progress=False)
    return out, params


@pytest.fixture(scope="module")
def aqua_file(tiny_llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AquaKVParams]:
    return written(tiny_llama_gguf, tmp_path_factory, random_params())


@pytest.fixture(scope="module")
def readers(tiny_llama_gguf: Path, aqua_file) -> tuple[GGUFReader, GGUFReader]:
    """gguf-py's own reader (independent of ours) on the input and on the written file."""
    return GGUFReader(tiny_llama_gguf), GGUFReader(aqua_file[0])


def test_original_tensors_and_metadata_are_copied_byte_identically(readers) -> None:
    src, dst = readers
    dst_tensors = {t.name: t for t in dst.tensors}
    for t in src.tensors:
        d = dst_tensors[t.name]
        assert d.tensor_type == t.tensor_type and d.shape.tolist() == t.shape.tolist()
        assert np.asarray(d.data).tobytes() == np.asarray(t.data).tobytes(), t.name
    for name, field in src.fields.items():
        if name.startswith("GGUF."):
            continue
        got = dst.fields[name]
        assert got.types == field.types, name
        assert got.contents() == field.contents(), name
        assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
                   for a, b in zip(got.parts[-len(field.data):], field.parts[-len(field.data):])), name
    extra = set(dst_tensors) - {t.name for t in src.tensors}
    assert all(names.is_aquakv_tensor(n) for n in extra) and len(extra) == 2 + 5 * (N_LAYERS - 1)


def test_aquakv_tensors_read_back_exactly(aqua_file) -> None:
    out, params = aqua_file
    back = read_aqua_gguf(out)
    assert back.channel_order == "llama.cpp"
    np.testing.assert_array_equal(back.grid, params.grid)
    np.testing.assert_array_equal(back.grid0, params.grid0)
    assert (back.group_size, back.prefix_tokens, back.recent_tokens) == (64, 4, 128)
    assert back.predictors[0] is None
    for name, arr in back.predictors[1].arrays().items():
        want = getattr(params.predictors[1], name)
        # Weights are stored f16, biases f32.
        expected = want.astype(np.float16) if name in names.WEIGHT_FIELDS else want
        assert arr.dtype == expected.dtype
        np.testing.assert_array_equal(arr, expected)
    assert back.calibration["text"] == "unit test" and back.calibration["tokens"] == 1234
    np.testing.assert_allclose(back.calibration["k_pred_relmse"], [1.0, 0.25])


def test_gguf_orientation_is_cin_fastest(aqua_file, readers) -> None:
    _, params = aqua_file
    reader = readers[1]
    t = next(t for t in reader.tensors if t.name == "blk.1.aquakv_k_pred.weight")
    # ne0 (fastest) = C_in; the numpy view is [C_out, C_in] and p = W @ x + b.
    assert t.shape.tolist() == [C, C]
    w = np.asarray(t.data)
    np.testing.assert_array_equal(w, params.predictors[1].k_weight.astype(np.float16))
    g = next(t for t in reader.tensors if t.name == "aquakv.grid")
    assert g.shape.tolist() == [2, 16]  # ne = [dim, n_points]: numpy [n_points, dim]


def test_metadata_keys_are_exact(readers) -> None:
    fields = readers[1].fields
    for key, value in [("aquakv.version", 1), ("aquakv.grid.dim", 2), ("aquakv.grid.size", 16),
                       ("aquakv.grid0.size", 256), ("aquakv.group_size", 64), ("aquakv.prefix_tokens", 4),
                       ("aquakv.recent_tokens", 128)]:
        assert fields[key].contents() == value, key
    assert fields["aquakv.calibration.text"].contents() == "unit test"


def test_permutation_matches_convert_hf_to_gguf(tiny_llama_hf: Path, tiny_llama_gguf: Path) -> None:
    """llama.cpp's attn_k rows are the Hugging Face k_proj rows taken in ``perm`` order."""
    from safetensors.numpy import load_file

    hf = load_file(str(tiny_llama_hf / "model.safetensors"))
    k_hf = hf["model.layers.0.self_attn.k_proj.weight"]
    raw = RawGGUF(tiny_llama_gguf)
    k_gguf = raw.tensor_array(raw.tensor("blk.0.attn_k.weight"))
    perm = llama_cpp_key_permutation(N_KV, HEAD_DIM)
    np.testing.assert_array_equal(k_gguf, k_hf[perm])
    assert not np.array_equal(k_gguf, k_hf)


def test_permuted_predictors_commute_with_the_channel_permutation() -> None:
    """A' (P k) + a' = P (A k + a) and B_K' (P k) = B_K k for any key vector k."""
    params = random_params(order="hf")
    perm = llama_cpp_key_permutation(N_KV, HEAD_DIM)
    lp = params.with_channel_order("llama.cpp", permutes_qk=True)
    rng = np.random.default_rng(1)
    k, v = rng.standard_normal(C).astype(np.float64), rng.standard_normal(C).astype(np.float64)
    a, b = params.predictors[1], lp.predictors[1]
    np.testing.assert_allclose(b.k_weight @ k[perm] + b.k_bias, (a.k_weight @ k + a.k_bias)[perm], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.v_weight_k @ k[perm] + b.v_weight_v @ v + b.v_bias,
                               a.v_weight_k @ k + a.v_weight_v @ v + a.v_bias, rtol=1e-5, atol=1e-5)
    back = lp.with_channel_order("hf", permutes_qk=True)
    for name, arr in back.predictors[1].arrays().items():
        np.testing.assert_array_equal(arr, getattr(a, name))
    same = params.with_channel_order("llama.cpp", permutes_qk=False)
    np.testing.assert_array_equal(same.predictors[1].k_weight, a.k_weight)


def test_writer_refuses_hf_order_and_its_own_input(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="llama.cpp channel order"):
        write_aqua_gguf(tiny_llama_gguf, tmp_path / "x.gguf", random_params(order="hf"), progress=False)
    with pytest.raises(AquaKVFormatError, match="overwrite the input"):
        write_aqua_gguf(tiny_llama_gguf, tiny_llama_gguf, random_params(), progress=False)
    assert not list(tmp_path.iterdir())


def test_writer_refuses_an_already_converted_file(aqua_file, tmp_path: Path) -> None:
    out, params = aqua_file
    with pytest.raises(AquaKVFormatError, match="already carries aquakv"):
        write_aqua_gguf(out, tmp_path / "again.gguf", params, progress=False)
    assert not (tmp_path / "again.gguf").exists()


def test_reader_errors(aqua_file, tiny_llama_gguf: Path, tmp_path: Path, gguf_edit) -> None:
    out, _ = aqua_file
    with pytest.raises(AquaKVFormatError, match="no such file"):
        read_aqua_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(AquaKVFormatError, match="not a readable GGUF"):
        read_aqua_gguf(junk)
    size = out.stat().st_size
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(out.read_bytes()[: size - 1000])
    with pytest.raises(AquaKVFormatError, match="truncated|not a readable"):
        read_aqua_gguf(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(out.read_bytes()[:100])
    with pytest.raises(AquaKVFormatError):
        read_aqua_gguf(head)
    with pytest.raises(AquaKVFormatError, match="no aquakv"):
        read_aqua_gguf(tiny_llama_gguf)
    with pytest.raises(AquaKVFormatError, match="missing tensor blk.1.aquakv_v_pred_v.weight"):
        read_aqua_gguf(gguf_edit(out, tmp_path / "drop.gguf", drop_tensors=("blk.1.aquakv_v_pred_v.weight",)))
    with pytest.raises(AquaKVFormatError, match="aquakv.grid has shape"):
        read_aqua_gguf(gguf_edit(out, tmp_path / "grid.gguf", set_fields={"aquakv.grid.size": 64}))
    with pytest.raises(AquaKVFormatError, match="blk.0.attn_k.weight has GGUF shape"):
        read_aqua_gguf(gguf_edit(out, tmp_path / "kv.gguf", set_fields={"llama.attention.head_count_kv": 4}))
    with pytest.raises(AquaKVFormatError, match="missing tensor blk.2.aquakv_k_pred.weight"):
        read_aqua_gguf(gguf_edit(out, tmp_path / "layers.gguf", set_fields={"llama.block_count": 3}))
    with pytest.raises(AquaKVFormatError, match="group_size"):
        read_aqua_gguf(gguf_edit(out, tmp_path / "group.gguf", set_fields={"aquakv.group_size": 48}))
    with pytest.raises(AquaKVFormatError, match="version"):
        read_aqua_gguf(gguf_edit(out, tmp_path / "ver.gguf", set_fields={"aquakv.version": 99}))


def test_predictor_size_accounting() -> None:
    params = random_params()
    assert params.predictor_bytes() == (N_LAYERS - 1) * (3 * C * C * 2 + 2 * C * 4)


def block_params(block: int) -> AquaKVParams:
    """random_params with every weight reduced to its diagonal [block, block] blocks."""
    params = random_params(seed=3)
    mask = (np.arange(C)[:, None] // block == np.arange(C)[None, :] // block).astype(np.float32)
    params.predictors = [None if p is None else p.map(lambda name, a: a * mask if a.ndim == 2 else a)
                         for p in params.predictors]
    params.predictor_block_size = block
    return params


def test_block_diagonal_predictors_round_trip_and_bad_blocks_are_refused(tiny_llama_gguf: Path, tmp_path: Path,
                                                                         gguf_edit) -> None:
    out = write_aqua_gguf(tiny_llama_gguf, tmp_path / "block.gguf", block_params(HEAD_DIM), progress=False)
    back = read_aqua_gguf(out)
    assert back.predictor_block_size == HEAD_DIM
    assert RawGGUF(out).get("aquakv.predictor.block_size") == HEAD_DIM
    assert read_aqua_gguf(tmp_path / "block.gguf").predictors[1].k_weight[0, HEAD_DIM] == 0
    # dense files carry no block key and read back as dense
    dense = write_aqua_gguf(tiny_llama_gguf, tmp_path / "dense.gguf", random_params(), progress=False)
    assert RawGGUF(dense).get("aquakv.predictor.block_size") is None and read_aqua_gguf(dense).predictor_block_size == 0

    wrong = random_params()
    wrong.predictor_block_size = HEAD_DIM
    with pytest.raises(ValueError, match="outside the diagonal 64x64 blocks"):
        write_aqua_gguf(tiny_llama_gguf, tmp_path / "wrong.gguf", wrong, progress=False)
    with pytest.raises(ValueError, match="must divide C = 128"):
        write_aqua_gguf(tiny_llama_gguf, tmp_path / "odd.gguf", block_params(48), progress=False)
    assert not (tmp_path / "wrong.gguf").exists() and not (tmp_path / "odd.gguf").exists()
    with pytest.raises(AquaKVFormatError, match="outside its diagonal 32x32 blocks"):
        read_aqua_gguf(gguf_edit(out, tmp_path / "b32.gguf", set_fields={"aquakv.predictor.block_size": 32}))
    with pytest.raises(AquaKVFormatError, match="must divide C = 128"):
        read_aqua_gguf(gguf_edit(out, tmp_path / "b48.gguf", set_fields={"aquakv.predictor.block_size": 48}))


# -- low-rank predictors (aquakv.predictor.form = "lowrank") ------------------------------------------------------

RANK_K, RANK_V = 16, 8


def lowrank_params(order: str = "llama.cpp", seed: int = 5) -> AquaKVParams:
    from aquakv_gguf.testing import random_aquakv_params

    params = random_aquakv_params(N_LAYERS, N_KV, HEAD_DIM, seed=seed, rank_k=RANK_K, rank_v=RANK_V)
    return dataclasses.replace(params, channel_order=order)


@pytest.fixture(scope="module")
def lowrank_file(tiny_llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AquaKVParams]:
    return written(tiny_llama_gguf, tmp_path_factory, lowrank_params())


def test_lowrank_round_trip(lowrank_file) -> None:
    """Form, ranks, factors (f16, as given) and biases read back; no dense weights are stored."""
    out, params = lowrank_file
    raw = RawGGUF(out)
    assert raw.get(names.KEY_PREDICTOR_FORM) == "lowrank"
    assert raw.get(names.KEY_PREDICTOR_RANK_K) == RANK_K and raw.get(names.KEY_PREDICTOR_RANK_V) == RANK_V
    assert raw.fields[names.KEY_PREDICTOR_RANK_K].vtype == GGUFValueType.UINT32
    assert raw.get(names.KEY_PREDICTOR_BLOCK) is None
    stored = {t.name for t in raw.tensors if names.is_aquakv_tensor(t.name)}
    assert not any(n.endswith(("aquakv_k_pred.weight", "aquakv_v_pred_k.weight", "aquakv_v_pred_v.weight"))
                   for n in stored)
    assert len(stored) == 2 + 7 * (N_LAYERS - 1)
    # GGUF ne = [in, out], numpy [out, in]
    t = raw.tensor("blk.1.aquakv_k_pred_down.weight")
    assert list(t.ne) == [C, RANK_K] and raw.tensor_array(t).dtype == np.float16
    assert list(raw.tensor("blk.1.aquakv_v_pred_up.weight").ne) == [RANK_V, C]

    back = read_aqua_gguf(out)
    assert (back.predictor_form, back.predictor_rank_k, back.predictor_rank_v) == ("lowrank", RANK_K, RANK_V)
    assert back.predictor_block_size == 0
    got, want = back.predictors[1], params.predictors[1]
    for name, arr in want.factors.arrays().items():
        assert getattr(got.factors, name).dtype == np.float16
        np.testing.assert_array_equal(getattr(got.factors, name), arr.astype(np.float16), err_msg=name)
    np.testing.assert_array_equal(got.k_bias, want.k_bias)
    np.testing.assert_array_equal(got.v_bias, want.v_bias)
    # the dense fields are the products of the stored factors (random_aquakv_params' factors are f16-exact)
    for name in names.WEIGHT_FIELDS:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert back.predictor_bytes() == params.predictor_bytes() == \
        (N_LAYERS - 1) * ((2 * RANK_K * C + 3 * RANK_V * C) * 2 + 2 * C * 4)


def test_dense_files_declare_their_form_and_old_files_read_as_dense(aqua_file, tiny_llama_gguf: Path,
                                                                    tmp_path: Path) -> None:
    from aquakv_gguf.gguf_io import aquakv_metadata, aquakv_tensors
    from aquakv_gguf.gguf_io.rawgguf import rewrite

    out, params = aqua_file
    assert RawGGUF(out).get(names.KEY_PREDICTOR_FORM) == "dense"
    assert RawGGUF(out).get(names.KEY_PREDICTOR_RANK_K) is None
    # a file from before the form key existed: the same data without it
    old = rewrite(RawGGUF(tiny_llama_gguf), tmp_path / "old.gguf", add_tensors=aquakv_tensors(params),
                  add_fields=[r for r in aquakv_metadata(params) if r[0] != names.KEY_PREDICTOR_FORM])
    assert RawGGUF(old).get(names.KEY_PREDICTOR_FORM) is None
    a, b = read_aqua_gguf(old), read_aqua_gguf(out)
    assert (a.predictor_form, a.predictor_rank_k, a.predictor_rank_v) == ("dense", 0, 0)
    for name, arr in a.predictors[1].arrays().items():
        np.testing.assert_array_equal(arr, getattr(b.predictors[1], name))
    assert a.predictors[1].factors is None


def test_lowrank_channel_order_permutation_both_ways() -> None:
    """U_k' = P U_k, D_k' = D_k Pᵀ, D_vk' = D_vk Pᵀ: the permuted predictors commute with P, and back is exact."""
    from aquakv_gguf.reference.semantics import predict_keys_lowrank, predict_values_lowrank

    params = lowrank_params(order="hf")
    perm = llama_cpp_key_permutation(N_KV, HEAD_DIM)
    lp = params.with_channel_order("llama.cpp", permutes_qk=True)
    a, b = params.predictors[1], lp.predictors[1]
    fa, fb = a.factors, b.factors
    np.testing.assert_array_equal(fb.k_up, fa.k_up[perm])
    np.testing.assert_array_equal(fb.k_down, fa.k_down[:, perm])
    np.testing.assert_array_equal(fb.v_down_k, fa.v_down_k[:, perm])
    np.testing.assert_array_equal(fb.v_down_v, fa.v_down_v)
    np.testing.assert_array_equal(fb.v_up, fa.v_up)
    rng = np.random.default_rng(2)
    k, v = (torch.from_numpy(rng.standard_normal(C)) for _ in range(2))
    t = lambda x: torch.from_numpy(np.asarray(x, dtype=np.float64))
    p_hf = predict_keys_lowrank(k, t(fa.k_down), t(fa.k_up), t(a.k_bias))
    p_ll = predict_keys_lowrank(k[perm], t(fb.k_down), t(fb.k_up), t(b.k_bias))
    torch.testing.assert_close(p_ll, p_hf[perm])
    q_hf = predict_values_lowrank(k, v, t(fa.v_down_k), t(fa.v_down_v), t(fa.v_up), t(a.v_bias))
    q_ll = predict_values_lowrank(k[perm], v, t(fb.v_down_k), t(fb.v_down_v), t(fb.v_up), t(b.v_bias))
    torch.testing.assert_close(q_ll, q_hf)
    # the dense products are permuted like dense weights
    np.testing.assert_array_equal(b.k_weight, a.k_weight[np.ix_(perm, perm)])
    back = lp.with_channel_order("hf", permutes_qk=True)
    for name, arr in back.predictors[1].arrays().items():
        np.testing.assert_array_equal(arr, a.arrays()[name], err_msg=name)
    assert (back.predictor_form, back.predictor_rank_k, back.predictor_rank_v) == ("lowrank", RANK_K, RANK_V)


def test_writer_refuses_bad_lowrank_params(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    def refuse(params: AquaKVParams, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            write_aqua_gguf(tiny_llama_gguf, tmp_path / "bad.gguf", params, progress=False)
        assert not (tmp_path / "bad.gguf").exists()

    good = lowrank_params()
    refuse(dataclasses.replace(good, predictor_block_size=HEAD_DIM), "cannot also be block-diagonal")
    refuse(dataclasses.replace(good, predictor_rank_k=C + 1), r"rank_k 129 must be in \[1, C = 128\]")
    refuse(dataclasses.replace(good, predictor_rank_v=0), r"rank_v 0 must be in \[1, C = 128\]")
    refuse(dataclasses.replace(good, predictor_form="sparse"), "unknown predictor form 'sparse'")
    refuse(dataclasses.replace(good, predictor_rank_k=8), r"layer 1 k_down: shape \(16, 128\), expected \(8, 128\)")
    no_factors = dataclasses.replace(good, predictors=[None, dataclasses.replace(good.predictors[1], factors=None)])
    refuse(no_factors, "layer 1: predictor_form is 'lowrank' but the layer has no low-rank factors")
    dense_with_factors = dataclasses.replace(good, predictor_form="dense", predictor_rank_k=0, predictor_rank_v=0)
    refuse(dense_with_factors, "layer 1: predictor_form is 'dense' but the layer carries low-rank factors")
    refuse(dataclasses.replace(random_params(), predictor_rank_k=4), "dense predictors have no ranks")


def test_reader_refuses_bad_lowrank_files(lowrank_file, aqua_file, tmp_path: Path, gguf_edit) -> None:
    from aquakv_gguf.gguf_io.rawgguf import rewrite

    out, _ = lowrank_file

    def refuse(path: Path, match: str) -> None:
        with pytest.raises(AquaKVFormatError, match=match):
            read_aqua_gguf(path)

    refuse(gguf_edit(out, tmp_path / "form.gguf", set_fields={names.KEY_PREDICTOR_FORM: "sparse"}),
           "unknown aquakv.predictor.form 'sparse'")
    refuse(gguf_edit(out, tmp_path / "rank.gguf", set_fields={names.KEY_PREDICTOR_RANK_K: C + 1}),
           r"rank_k 129 must be in \[1, C = 128\]")
    refuse(gguf_edit(out, tmp_path / "shape.gguf", set_fields={names.KEY_PREDICTOR_RANK_V: 4}),
           r"tensor blk.1.aquakv_v_pred_k_down.weight has shape \[8, 128\] .*expected \[4, 128\]")
    refuse(gguf_edit(out, tmp_path / "drop.gguf", drop_tensors=("blk.1.aquakv_k_pred_up.weight",)),
           "missing tensor blk.1.aquakv_k_pred_up.weight")
    u32 = GGUFValueType.UINT32
    refuse(rewrite(RawGGUF(out), tmp_path / "block.gguf", add_fields=[(names.KEY_PREDICTOR_BLOCK, HEAD_DIM, u32, None)]),
           "block_size and aquakv.predictor.form 'lowrank' cannot be combined")
    dense_w = {"blk.1.aquakv_k_pred.weight": np.zeros((C, C), np.float16)}
    refuse(rewrite(RawGGUF(out), tmp_path / "extra.gguf", add_tensors=dense_w),
           "unexpected AQUA-KV tensors .*blk.1.aquakv_k_pred.weight.*predictor form lowrank")
    dense, _ = aqua_file
    refuse(rewrite(RawGGUF(dense), tmp_path / "ranked.gguf", add_fields=[(names.KEY_PREDICTOR_RANK_K, 8, u32, None)]),
           "aquakv.predictor.rank_k is set but aquakv.predictor.form is 'dense'")
    refuse(gguf_edit(dense, tmp_path / "dense_as_lr.gguf", set_fields={names.KEY_PREDICTOR_FORM: "lowrank"}),
           "missing metadata key aquakv.predictor.rank_k")


def test_values_from_keys_round_trip_permute_and_bad_values_are_refused(tiny_llama_gguf: Path, tmp_path: Path,
                                                                         gguf_edit) -> None:
    """aquakv.predictor.value_input: written only for k_prev (v_prev files keep their bytes), read
    back, and with k_prev the second value input (B_V, D_vv columns) is permuted like a key."""
    from aquakv_gguf.reference.semantics import predict_values, predict_values_lowrank

    assert names.KEY_PREDICTOR_VALUE_INPUT not in {r[0] for r in aquakv_metadata(random_params())}
    rng = np.random.default_rng(3)
    perm = llama_cpp_key_permutation(N_KV, HEAD_DIM)
    k, k_prev = (torch.from_numpy(rng.standard_normal(C)) for _ in range(2))
    t = lambda x: torch.from_numpy(np.asarray(x, dtype=np.float64))
    for params in (random_params(order="hf"), lowrank_params(order="hf")):
        params = dataclasses.replace(params, predictor_value_input="k_prev")
        lp = params.with_channel_order("llama.cpp", permutes_qk=True)
        a, b = params.predictors[1], lp.predictors[1]
        if params.predictor_form == "lowrank":
            fa, fb = a.factors, b.factors
            q_hf = predict_values_lowrank(k, k_prev, t(fa.v_down_k), t(fa.v_down_v), t(fa.v_up), t(a.v_bias))
            q_ll = predict_values_lowrank(k[perm], k_prev[perm], t(fb.v_down_k), t(fb.v_down_v), t(fb.v_up),
                                          t(b.v_bias))
        else:
            q_hf = predict_values(k, k_prev, t(a.v_weight_k), t(a.v_weight_v), t(a.v_bias))
            q_ll = predict_values(k[perm], k_prev[perm], t(b.v_weight_k), t(b.v_weight_v), t(b.v_bias))
        torch.testing.assert_close(q_ll, q_hf)
        out = write_aqua_gguf(tiny_llama_gguf, tmp_path / f"kprev-{params.predictor_form}.gguf", lp, progress=False)
        assert RawGGUF(out).get(names.KEY_PREDICTOR_VALUE_INPUT) == "k_prev"
        back = read_aqua_gguf(out)
        assert back.predictor_value_input == "k_prev"
        stored = "v_down_v" if params.predictor_form == "lowrank" else "v_weight_v"
        np.testing.assert_array_equal(back.predictors[1].arrays()[stored],
                                      b.arrays()[stored].astype(np.float16).astype(np.float32))
    with pytest.raises(AquaKVFormatError, match="unknown aquakv.predictor.value_input 'q_prev'"):
        read_aqua_gguf(gguf_edit(out, tmp_path / "bad-input.gguf",
                                 set_fields={names.KEY_PREDICTOR_VALUE_INPUT: "q_prev"}))
    with pytest.raises(ValueError, match="unknown value predictor input 'q_prev'"):
        write_aqua_gguf(tiny_llama_gguf, tmp_path / "bad.gguf",
                        dataclasses.replace(random_params(), predictor_value_input="q_prev"), progress=False)
    assert not (tmp_path / "bad.gguf").exists()
