"""Per-architecture recipes: loading, lookup, and refusal of layouts AQUA-KV cannot handle."""

from __future__ import annotations

from pathlib import Path

import pytest

from aquakv_gguf.calibrate import (
    UnsupportedModelError,
    all_recipes,
    load_recipe,
    recipe_for_gguf_arch,
    recipe_for_hf_config,
)


def test_every_family_has_a_recipe() -> None:
    recipes = {r.name: r for r in all_recipes()}
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(recipes)
    assert recipes["llama"].llama_cpp_permutes_qk and recipes["mistral"].llama_cpp_permutes_qk
    assert not recipes["qwen2"].llama_cpp_permutes_qk and not recipes["qwen3"].llama_cpp_permutes_qk
    assert recipes["qwen3"].key.endswith("k_norm")
    assert recipes["mistral"].converts_to == "llama"
    assert recipe_for_gguf_arch("llama").name == "llama"
    assert recipe_for_gguf_arch("qwen3").name == "qwen3"


def test_lookup_by_config() -> None:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    assert recipe_for_hf_config(LlamaConfig()).name == "llama"
    assert recipe_for_hf_config(MistralConfig(sliding_window=None)).name == "mistral"
    assert recipe_for_hf_config(Qwen2Config()).name == "qwen2"
    assert recipe_for_hf_config(Qwen3Config()).name == "qwen3"


def test_unsupported_and_sliding_window_models_are_refused() -> None:
    from transformers import GPT2Config, MistralConfig, Qwen2Config

    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gpt2'"):
        recipe_for_hf_config(GPT2Config())
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        recipe_for_hf_config(MistralConfig(sliding_window=4096))
    with pytest.raises(UnsupportedModelError, match="sliding"):
        recipe_for_hf_config(Qwen2Config(use_sliding_window=True, sliding_window=1024, max_window_layers=0))
    with pytest.raises(UnsupportedModelError, match="unsupported GGUF architecture 'mamba'"):
        recipe_for_gguf_arch("mamba")


def test_malformed_recipe_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[match]\nhf_model_types = ["x"]\n')
    with pytest.raises(UnsupportedModelError, match="missing key"):
        load_recipe(bad)
    bad.write_text("name = ")
    with pytest.raises(UnsupportedModelError, match="bad.toml"):
        load_recipe(bad)


def test_default_calibration_tokens_scale_with_kv_channels(tmp_path: Path) -> None:
    llama = recipe_for_gguf_arch("llama")
    assert llama.calib_tokens_per_channel > 0
    # Small models get the floor, wide caches a fixed number of tokens per channel.
    assert llama.default_calib_tokens(1) == llama.calib_tokens
    wide = 4 * llama.calib_tokens // llama.calib_tokens_per_channel
    assert llama.default_calib_tokens(wide) == wide * llama.calib_tokens_per_channel > llama.calib_tokens
    # A recipe without the key keeps its fixed count; a negative one is refused.
    text = llama.path.read_text()
    no_key = tmp_path / "no_key.toml"
    no_key.write_text("\n".join(line for line in text.splitlines() if not line.startswith("tokens_per_channel")))
    plain = load_recipe(no_key)
    assert plain.calib_tokens_per_channel == 0 and plain.default_calib_tokens(4096) == plain.calib_tokens
    negative = tmp_path / "negative.toml"
    negative.write_text(text.replace("tokens_per_channel = 256", "tokens_per_channel = -1"))
    assert negative.read_text() != text
    with pytest.raises(UnsupportedModelError, match="out of range"):
        load_recipe(negative)
