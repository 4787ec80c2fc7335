"""``python -m aquakv_gguf.convert``: GGUF and Hugging Face inputs, byte-identical copies, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aquakv_gguf.convert import convert, format_summary, main
from aquakv_gguf.gguf_io import RawGGUF, names, read_aqua_gguf

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be "
        "on his first entering a neighbourhood, this truth is so well fixed in the minds. ") * 60
SMALL = ["--calib-tokens", "1024", "--calib-seq-len", "128", "--quiet"]


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def from_gguf(tiny_llama_gguf: Path, calib_file: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("conv_gguf") / "tiny.aqua.gguf"
    # dense: these tests check the written [C, C] weights and their channel order
    summary = convert(tiny_llama_gguf, out, bits=2, calib_tokens=1024, calib_seq_len=128, calib_text=calib_file,
                      predictor_form="dense", progress=False)
    return summary, out


def assert_original_part_identical(src: Path, out: Path) -> None:
    a, b = RawGGUF(src), RawGGUF(out)
    for name, f in a.fields.items():
        assert b.fields[name].raw == f.raw, name
    tb = {t.name: t for t in b.tensors}
    for t in a.tensors:
        assert tb[t.name].raw == t.raw and a.tensor_bytes(t) == b.tensor_bytes(tb[t.name]), t.name
    assert set(tb) - {t.name for t in a.tensors} == {n for n in tb if names.is_aquakv_tensor(n)}


def test_gguf_input_is_copied_byte_identically(tiny_llama_gguf: Path, from_gguf) -> None:
    _, out = from_gguf
    assert_original_part_identical(tiny_llama_gguf, out)


def test_written_predictors_are_the_fitted_ones_after_permutation(from_gguf) -> None:
    summary, out = from_gguf
    back = read_aqua_gguf(out)
    permuted = summary.params_hf.with_channel_order("llama.cpp", permutes_qk=True)
    for layer in range(1, back.n_layers):
        for name, arr in back.predictors[layer].arrays().items():
            want = getattr(permuted.predictors[layer], name)
            np.testing.assert_array_equal(arr.astype(np.float32), want.astype(arr.dtype).astype(np.float32))
            np.testing.assert_array_equal(arr.astype(np.float32), getattr(summary.params.predictors[layer], name))
    assert back.group_size == 128 and back.grid.shape == (16, 2) and back.grid0.shape == (256, 2)
    cal = back.calibration
    assert cal["tokens"] == 1024 and cal["seed"] == 0 and cal["text"] == "calib.txt"
    assert len(cal["k_pred_relmse"]) == back.n_layers == len(cal["v_relmse"])


def test_summary_reports_errors_bits_time_and_memory(from_gguf) -> None:
    summary, _ = from_gguf
    text = format_summary(summary)
    assert "held-out relative MSE" in text and "bits per value" in text and "peak RAM" in text
    assert set(summary.bits_per_value) == {8192, 32768}
    assert 2 < summary.bits_per_value[32768] < summary.bits_per_value[8192] < 4
    assert summary.predictor_mib == pytest.approx((3 * 128 * 128 * 2 + 2 * 128 * 4) / 2**20)


def test_reference_cache_reads_the_file(from_gguf, tiny_llama_hf: Path) -> None:
    """The cache built from the GGUF (llama.cpp order) equals the one built from the fitted params."""
    from transformers import AutoModelForCausalLM

    from aquakv_gguf.eval.reference_eval import stepwise_logits
    from aquakv_gguf.reference import AquaKVCache

    summary, out = from_gguf
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_hf), dtype=torch.float32).eval()
    ids = torch.randint(0, 2000, (1, 200), generator=torch.Generator().manual_seed(0))
    a = stepwise_logits(model, ids, AquaKVCache(model, mode="aqua", params=read_aqua_gguf(out)), step=32)
    b = stepwise_logits(model, ids, AquaKVCache(model, mode="aqua", params=summary.params_hf), step=32)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_hf_input_matches_the_gguf_path(tiny_llama_hf: Path, tiny_llama_gguf: Path, calib_file: Path, from_gguf,
                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Hugging Face folder is converted by the pinned script, calibrated in the same (HF) channel order,
    and --force replaces an existing output."""
    out = tmp_path / "hf.aqua.gguf"
    out.write_bytes(b"old")
    rc = main([str(tiny_llama_hf), "--out", str(out), "--outtype", "f32", "--calib-text", str(calib_file),
               "--force", "--predictor", "dense", "--also", f"3:{tmp_path / 'hf3.aqua.gguf'}", *SMALL])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "wrote" in printed and "also wrote" in printed
    three = read_aqua_gguf(tmp_path / "hf3.aqua.gguf")
    assert three.grid.shape == (64, 2) and three.calibration["bits"] == 3
    assert_original_part_identical(tiny_llama_gguf, out)
    # transformers' GGUF loader undoes llama.cpp's Q/K permutation, so the GGUF path calibrates in
    # Hugging Face order like the folder path; both then permute once.  Were either path off by a
    # permutation, the key predictors would not match.
    hf, gg = read_aqua_gguf(out), read_aqua_gguf(from_gguf[1])
    for layer in range(1, hf.n_layers):
        for name, arr in hf.predictors[layer].arrays().items():
            np.testing.assert_allclose(arr.astype(np.float32), getattr(gg.predictors[layer], name).astype(np.float32),
                                       atol=2e-3, err_msg=name)
    twice = gg.with_channel_order("hf", permutes_qk=True).predictors[1].k_weight.astype(np.float32)
    assert not np.allclose(hf.predictors[1].k_weight.astype(np.float32), twice, atol=2e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf.aqua.gguf", "hf3.aqua.gguf"]


def test_default_predictor_is_the_fast_form_clamped_to_the_model():
    from aquakv_gguf.convert import DEFAULT_PREDICTOR, DEFAULT_VALUE_INPUT, default_predictor, parse_predictor
    assert parse_predictor(DEFAULT_PREDICTOR) == ("lowrank", 32, 64)
    assert DEFAULT_VALUE_INPUT == "k_prev"  # values without a chain: the CPU folds them (docs/PERF.md C8)
    assert default_predictor(192) == ("lowrank", 32, 64)
    assert default_predictor(48) == ("lowrank", 32, 48)


def run_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert err and err[-1].startswith("error: ")
    return err[-1]


def test_existing_output_and_input_are_protected(tiny_llama_gguf: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "exists.gguf"
    out.write_bytes(b"keep me")
    assert "exists" in run_error([str(tiny_llama_gguf), "--out", str(out), *SMALL], capsys)
    assert out.read_bytes() == b"keep me"
    before = tiny_llama_gguf.stat().st_mtime_ns
    msg = run_error([str(tiny_llama_gguf), "--out", str(tiny_llama_gguf), "--force", *SMALL], capsys)
    assert "overwrite the input" in msg and tiny_llama_gguf.stat().st_mtime_ns == before


def test_unwritable_output(tiny_llama_gguf: Path, tmp_path: Path, capsys) -> None:
    assert "does not exist" in run_error([str(tiny_llama_gguf), "--out", str(tmp_path / "no" / "x.gguf"), *SMALL], capsys)
    assert "cannot write" in run_error([str(tiny_llama_gguf), "--out", "/proc/aquakv-test.gguf", *SMALL], capsys)
    (tmp_path / "d.gguf").mkdir()
    assert "is a folder" in run_error([str(tiny_llama_gguf), "--out", str(tmp_path / "d.gguf"), *SMALL], capsys)


def hf_folder(tmp_path: Path, config: dict) -> Path:
    folder = tmp_path / config["model_type"]
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_unsupported_and_sliding_window_architectures(tmp_path: Path, capsys) -> None:
    out = tmp_path / "o.gguf"
    gpt2 = hf_folder(tmp_path, {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64})
    assert "unsupported architecture 'gpt2'" in run_error([str(gpt2), "--out", str(out), *SMALL], capsys)
    mistral = hf_folder(tmp_path, {"model_type": "mistral", "sliding_window": 4096, "num_hidden_layers": 2,
                                   "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
                                   "intermediate_size": 256, "vocab_size": 1000})
    assert "sliding-window" in run_error([str(mistral), "--out", str(out), *SMALL], capsys)
    qwen2 = hf_folder(tmp_path, {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 1024,
                                 "max_window_layers": 0, "num_hidden_layers": 2, "hidden_size": 128,
                                 "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 256,
                                 "vocab_size": 1000})
    assert "sliding" in run_error([str(qwen2), "--out", str(out), *SMALL], capsys)
    assert not out.exists()


def test_gguf_whose_architecture_or_dims_do_not_match(tiny_llama_gguf: Path, tmp_path: Path, gguf_edit, capsys) -> None:
    out = tmp_path / "o.gguf"
    gpt2 = gguf_edit(tiny_llama_gguf, tmp_path / "arch.gguf", set_fields={"general.architecture": "gpt2"})
    assert "unsupported GGUF architecture 'gpt2'" in run_error([str(gpt2), "--out", str(out), *SMALL], capsys)
    dims = gguf_edit(tiny_llama_gguf, tmp_path / "dims.gguf", set_fields={"llama.attention.head_count_kv": 4})
    assert "attn_k.weight has GGUF shape" in run_error([str(dims), "--out", str(out), *SMALL], capsys)
    swa = tmp_path / "swa.gguf"
    from gguf import GGUFValueType

    from aquakv_gguf.gguf_io.rawgguf import rewrite

    rewrite(RawGGUF(tiny_llama_gguf), swa, add_fields=[("llama.attention.sliding_window", 256, GGUFValueType.UINT32, None)])
    assert "sliding-window" in run_error([str(swa), "--out", str(out), *SMALL], capsys)
    cut = gguf_edit(tiny_llama_gguf, tmp_path / "cut.gguf", truncate=tiny_llama_gguf.stat().st_size // 2)
    assert "truncated" in run_error([str(cut), "--out", str(out), *SMALL], capsys)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\0" * 100)
    assert "neither a GGUF" in run_error([str(junk), "--out", str(out), *SMALL], capsys)
    assert "--group-size 48" in run_error([str(tiny_llama_gguf), "--out", str(out), "--group-size", "48", *SMALL], capsys)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_already_converted_input(from_gguf, tmp_path: Path, capsys) -> None:
    msg = run_error([str(from_gguf[1]), "--out", str(tmp_path / "o.gguf"), *SMALL], capsys)
    assert "already carries aquakv" in msg


def test_empty_or_short_calibration_text(tiny_llama_hf: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o.gguf"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "calibration text is empty" in run_error([str(tiny_llama_hf), "--out", str(out), "--calib-text", str(empty), *SMALL], capsys)
    short = tmp_path / "short.txt"
    short.write_text("Hello there, Mr. Darcy.")
    assert "too short" in run_error([str(tiny_llama_hf), "--out", str(out), "--calib-text", str(short), *SMALL], capsys)
    missing = tmp_path / "missing.txt"
    assert "cannot read calibration text" in run_error(
        [str(tiny_llama_hf), "--out", str(out), "--calib-text", str(missing), *SMALL], capsys)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "short.txt"]


def test_block_diagonal_predictors_are_written_and_read_back(tiny_llama_gguf: Path, calib_file: Path,
                                                            tmp_path: Path, capsys) -> None:
    """``--predictor-block 64`` (head_dim): block-diagonal in llama.cpp order on disk, the block size in the metadata."""
    from aquakv_gguf.gguf_io.params import off_block_max

    out = tmp_path / "block.aqua.gguf"
    assert main([str(tiny_llama_gguf), "--out", str(out), "--calib-text", str(calib_file), "--predictor-block", "64",
                 *SMALL]) == 0
    assert "block-diagonal predictors 64x64" in capsys.readouterr().out
    back = read_aqua_gguf(out)
    assert back.predictor_block_size == 64 and back.channel_order == "llama.cpp"
    raw = RawGGUF(out)
    assert raw.fields[names.KEY_PREDICTOR_BLOCK].value == 64
    for pred in back.predictors[1:]:
        for name in ("k_weight", "v_weight_k", "v_weight_v"):
            w = getattr(pred, name).astype(np.float32)
            assert off_block_max(w, 64) == 0.0 and np.abs(w).max() > 0
    assert_original_part_identical(tiny_llama_gguf, out)
    bad = tmp_path / "bad.gguf"
    assert "multiple of head_dim" in run_error([str(tiny_llama_gguf), "--out", str(bad), "--predictor-block", "32",
                                                *SMALL], capsys)
    assert "must divide" in run_error([str(tiny_llama_gguf), "--out", str(bad), "--predictor-block", "48", *SMALL],
                                      capsys)
    assert not bad.exists()


def test_lowrank_predictors_are_written_and_read_back(tiny_llama_gguf: Path, calib_file: Path, tmp_path: Path,
                                                      capsys) -> None:
    """``--predictor lowrank:16``: the factors (llama.cpp order) and ranks on disk, no dense weights."""
    from aquakv_gguf.convert import parse_predictor

    out, js = tmp_path / "lowrank.aqua.gguf", tmp_path / "summary.json"
    assert main([str(tiny_llama_gguf), "--out", str(out), "--calib-text", str(calib_file), "--predictor", "lowrank:16",
                 "--summary-json", str(js), *SMALL]) == 0
    printed = capsys.readouterr().out
    # a low-rank form takes the default value input (k_prev: values from keys, no value chain)
    assert "low-rank predictors (keys rank 16, values rank 16, values from keys)" in printed
    want_mib = (2 * 16 * 128 * 2 + 3 * 16 * 128 * 2 + 2 * 128 * 4) / 2**20
    summary = json.loads(js.read_text())
    assert (summary["predictor_form"], summary["predictor_rank_k"], summary["predictor_rank_v"]) == ("lowrank", 16, 16)
    assert summary["predictor_mib"] == pytest.approx(want_mib)
    back = read_aqua_gguf(out)
    assert (back.predictor_form, back.predictor_rank_k, back.predictor_rank_v) == ("lowrank", 16, 16)
    assert back.predictor_value_input == summary["predictor_value_input"] == "k_prev"
    raw = RawGGUF(out)
    assert raw.get(names.KEY_PREDICTOR_FORM) == "lowrank" and raw.get(names.KEY_PREDICTOR_BLOCK) is None
    assert raw.tensor("blk.1.aquakv_k_pred.weight") is None and raw.tensor("blk.1.aquakv_k_pred_down.weight") is not None
    for pred in back.predictors[1:]:
        assert pred.factors.k_down.shape == (16, 128) and pred.factors.v_up.shape == (128, 16)
        assert np.abs(pred.factors.k_up).max() > 0
    assert_original_part_identical(tiny_llama_gguf, out)

    assert parse_predictor("dense") == ("dense", 0, 0)
    assert parse_predictor("lowrank:8,32") == ("lowrank", 8, 32)
    bad = tmp_path / "bad.gguf"
    common = [str(tiny_llama_gguf), "--out", str(bad), *SMALL]
    assert "cannot also be block-diagonal" in run_error([*common, "--predictor", "lowrank:16", "--predictor-block", "64"],
                                                        capsys)
    assert "rank_k 200 must be in [1, C = 128]" in run_error([*common, "--predictor", "lowrank:200,8"], capsys)
    for text in ("lowrank", "lowrank:", "lowrank:4,5,6", "dense:4", "sparse:8"):
        assert "--predictor expects dense, lowrank:R or lowrank:RK,RV" in run_error([*common, "--predictor", text],
                                                                                    capsys), text
    assert not bad.exists()


def test_lowrank_file_equals_the_fitted_factors(tiny_llama_gguf: Path, tiny_llama_hf: Path, calib_file: Path,
                                                tmp_path: Path) -> None:
    """The written factors are the fitted ones permuted into llama.cpp order; the reference cache reads the file
    exactly as it uses the fitted (Hugging Face order) parameters."""
    from transformers import AutoModelForCausalLM

    from aquakv_gguf.eval.reference_eval import stepwise_logits
    from aquakv_gguf.reference import AquaKVCache

    out = tmp_path / "lr.aqua.gguf"
    summary = convert(tiny_llama_gguf, out, bits=2, calib_tokens=1024, calib_seq_len=128, calib_text=calib_file,
                      predictor_form="lowrank", rank_k=8, rank_v=24, progress=False)
    back = read_aqua_gguf(out)
    permuted = summary.params_hf.with_channel_order("llama.cpp", permutes_qk=True)
    for layer in range(1, back.n_layers):
        for name, arr in back.predictors[layer].factors.arrays().items():
            np.testing.assert_array_equal(arr.astype(np.float32), getattr(permuted.predictors[layer].factors, name))
    assert summary.predictor_mib == pytest.approx((2 * 8 * 128 * 2 + 3 * 24 * 128 * 2 + 2 * 128 * 4) / 2**20)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_hf), dtype=torch.float32).eval()
    ids = torch.randint(0, 2000, (1, 200), generator=torch.Generator().manual_seed(0))
    a = stepwise_logits(model, ids, AquaKVCache(model, mode="aqua", params=back), step=32)
    b = stepwise_logits(model, ids, AquaKVCache(model, mode="aqua", params=summary.params_hf), step=32)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
