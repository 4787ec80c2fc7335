"""Tiny random models: architecture features, non-degenerate logits, and GGUF conversion."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from aquakv_gguf.testing import build_tiny_hf_model, convert_hf_to_gguf

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. However little known the feelings or views")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("tiny")
    yield {arch: build_tiny_hf_model(root / arch, arch=arch) for arch in ("llama", "qwen2", "qwen3")}
    # ~100 MB per model: pytest keeps old temp folders, so do not leave these in them.
    shutil.rmtree(root, ignore_errors=True)


def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder))


def _tensor_names(folder: Path) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        return list(fh.keys())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_model_is_well_formed_and_not_degenerate(tiny_dirs: dict[str, Path], arch: str) -> None:
    folder = tiny_dirs[arch]
    config = json.loads((folder / "config.json").read_text())
    model, tokenizer = _load(folder)

    assert config["model_type"] == arch
    assert config["tie_word_embeddings"] is False
    assert config["max_position_embeddings"] == 4096
    assert config["num_hidden_layers"] == 2 and config["num_key_value_heads"] == 2
    assert config["head_dim"] == 64 and config["hidden_size"] == 256
    assert config["vocab_size"] == len(tokenizer) == 49152
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    # SmolLM2's real vocabulary: ordinary English becomes few, whole-word tokens.
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert 25 <= ids.shape[1] <= 40
    assert tokenizer.decode(ids[0]) == TEXT

    with torch.no_grad():
        logits = model(ids).logits[0]
    assert torch.isfinite(logits).all()
    top1 = logits.argmax(-1)
    assert len(set(top1.tolist())) >= ids.shape[1] // 3, f"top-1 barely changes: {top1.tolist()}"
    # Logits move along the sequence by a sizeable fraction of their spread.
    assert (logits.std(0).mean() / logits.std()).item() > 0.3
    # The context matters, not only the current token: same token, different histories.
    with torch.no_grad():
        a = model(torch.tensor([[ids[0, 0], ids[0, 5]]])).logits[0, -1]
        b = model(torch.tensor([[ids[0, 3], ids[0, 5]]])).logits[0, -1]
    assert (a - b).abs().max().item() > 1e-2

    attn = model.model.layers[0].self_attn
    if arch == "qwen2":
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            assert proj.bias is not None and proj.bias.abs().mean().item() > 0.01
    else:
        assert attn.k_proj.bias is None
    if arch == "qwen3":
        assert (attn.k_norm.weight - 1).abs().mean().item() > 0.01
        assert (attn.q_norm.weight - 1).abs().mean().item() > 0.01


def test_seed_determines_the_weights(tmp_path: Path) -> None:
    small = dict(n_layers=1, hidden_size=64, n_heads=2, n_kv_heads=1, head_dim=32,
                 intermediate_size=128)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_hf_model(tmp_path / "a", arch="qwen2", seed=7, **small)
    assert torch.equal(torch.rand(3), before), "the caller's RNG state was disturbed"
    b = build_tiny_hf_model(tmp_path / "b", arch="qwen2", seed=7, **small)
    from safetensors.torch import load_file

    wa, wb = (load_file(str(d / "model.safetensors")) for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(v.dtype == torch.float32 for v in wa.values())
    # The extra init draws from its own generator: biases differ from one another.
    bias = wa["model.layers.0.self_attn.k_proj.bias"]
    assert bias.std().item() > 0.02 and len(set(bias.tolist())) == bias.numel()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_conversion_writes_every_tensor(tiny_dirs: dict[str, Path], tmp_path: Path,
                                             arch: str) -> None:
    from gguf import GGUFReader

    out = convert_hf_to_gguf(tiny_dirs[arch], tmp_path / f"{arch}.gguf")
    assert out == tmp_path / f"{arch}.gguf"
    assert [p.name for p in tmp_path.iterdir()] == [out.name], "temporary file left behind"

    reader = GGUFReader(str(out))
    names = [t.name for t in reader.tensors]
    assert len(names) == len(_tensor_names(tiny_dirs[arch]))
    field = reader.fields
    assert field["general.architecture"].contents() == arch
    assert field[f"{arch}.block_count"].contents() == 2
    assert field[f"{arch}.attention.head_count_kv"].contents() == 2
    assert field["tokenizer.ggml.model"].contents() == "gpt2"
    assert field["tokenizer.ggml.pre"].contents() == "smollm"
    assert len(field["tokenizer.ggml.tokens"].contents()) == 49152
    assert "output.weight" in names  # untied head
    k = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    assert k.tensor_type.name == "F32" and sorted(int(d) for d in k.shape) == [128, 256]
    if arch == "qwen2":
        assert "blk.1.attn_v.bias" in names
    if arch == "qwen3":
        assert "blk.1.attn_k_norm.weight" in names
    del reader, k  # the reader memory-maps the file
    out.unlink()


def test_conversion_failure_is_reported(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(RuntimeError, match="convert_hf_to_gguf.py failed"):
        convert_hf_to_gguf(broken, tmp_path / "out" / "broken.gguf")
    assert list((tmp_path / "out").iterdir()) == []
