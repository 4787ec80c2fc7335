"""Tiny random-weight transformers models with a real tokenizer, and their GGUF conversion.

Tests need models of every supported architecture that build in seconds and need no hub:
the weights are random (seeded), the tokenizer is SmolLM2's, taken from the embedded GGUF
(:func:`aquakv_gguf.assets.smollm2_gguf`), so text tokenizes as it would for a real model and
llama.cpp's converter recognises the pre-tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from aquakv_gguf.assets import cache_dir, smollm2_gguf
from aquakv_gguf.assets._cache import locked, staged_dir
from aquakv_gguf.gguf_io.hf_convert import convert_hf_to_gguf  # re-exported: tests build tiny GGUFs with it

ARCHITECTURES = ("llama", "qwen2", "qwen3")

# Bump when the way the tokenizer is derived or saved changes, so stale caches are rebuilt.
_TOKENIZER_CACHE_VERSION = 1
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _tokenizer_cache_dir() -> Path:
    import transformers

    # The GGUF -> tokenizers conversion lives in transformers, so its version keys the cache.
    return cache_dir() / "tokenizers" / f"smollm2-v{_TOKENIZER_CACHE_VERSION}-tf{transformers.__version__}"


def _cached_tokenizer_is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _TOKENIZER_FILES) and (folder / "ok").is_file()


def smollm2_tokenizer_dir() -> Path:
    """A folder holding SmolLM2's tokenizer saved in transformers' format.

    Loading the tokenizer out of the GGUF takes transformers ~15 s (it reads the whole
    vocabulary and merges from GGUF metadata); it is done once and the saved files are reused.
    """
    folder = _tokenizer_cache_dir()
    if _cached_tokenizer_is_complete(folder):
        return folder
    with locked("tokenizer"):
        if _cached_tokenizer_is_complete(folder):
            return folder
        _derive_tokenizer(folder)
    return folder


def _derive_tokenizer(folder: Path) -> None:
    """Load the tokenizer out of the GGUF and save it into `folder` (write-then-rename)."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with staged_dir(folder, ".smollm2-tok-") as staging:
        tokenizer.save_pretrained(str(staging))
        _normalise_tokenizer_config(staging)
        (staging / "ok").write_text("complete\n", encoding="utf-8")


def _normalise_tokenizer_config(folder: Path) -> None:
    """Drop load-time fields that ``save_pretrained`` writes but that describe the loading
    session rather than the tokenizer (they would make a copied model claim to be 'local')."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _config(arch: str, *, vocab_size: int, n_layers: int, hidden_size: int, n_heads: int,
            n_kv_heads: int, head_dim: int, intermediate_size: int, bos: int | None,
            eos: int | None) -> Any:
    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        head_dim=head_dim, max_position_embeddings=4096, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02,
        bos_token_id=bos, eos_token_id=eos, hidden_act="silu",
    )
    if arch == "llama":
        from transformers import LlamaConfig

        config = LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    elif arch == "qwen2":
        from transformers import Qwen2Config

        config = Qwen2Config(use_sliding_window=False, **common)
    elif arch == "qwen3":
        from transformers import Qwen3Config

        config = Qwen3Config(attention_bias=False, use_sliding_window=False, **common)
    else:
        raise ValueError(f"unknown tiny-model architecture {arch!r} (choose from {', '.join(ARCHITECTURES)})")
    # transformers 5 keeps RoPE settings in rope_parameters; make sure theta lands there too.
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        rope["rope_theta"] = 10000.0
        rope.setdefault("rope_type", "default")
    config.dtype = "float32"
    return config


def build_tiny_hf_model(out_dir: Path, *, arch: str = "llama", n_layers: int = 2,
                        hidden_size: int = 256, n_heads: int = 4, n_kv_heads: int = 2,
                        head_dim: int = 64, intermediate_size: int = 512, seed: int = 0) -> Path:
    """Write a random-weight ``arch`` model (float32 safetensors) plus SmolLM2's tokenizer
    into ``out_dir`` and return ``out_dir``.

    ``arch`` is "llama", "qwen2" (Q/K/V projections with nonzero biases) or "qwen3" (per-head
    RMS norms on Q and K). Weights are N(0, 0.02) as transformers initialises them; norm
    weights and biases are perturbed away from their trivial values so code that ignores them
    produces visibly different numbers. The same ``seed`` gives the same weights, and the
    caller's torch RNG state is left untouched.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny-model architecture {arch!r} (choose from {', '.join(ARCHITECTURES)})")
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok_dir = smollm2_tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    config = _config(arch, vocab_size=len(tokenizer), n_layers=n_layers, hidden_size=hidden_size,
                     n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                     intermediate_size=intermediate_size, bos=tokenizer.bos_token_id,
                     eos=tokenizer.eos_token_id)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    # Ones would make a forgotten norm weight undetectable.
                    param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
                elif name.endswith(".bias"):
                    # A sixth of the projections' output scale (~0.3): dropping a bias visibly
                    # changes K and V, yet a constant V offset does not swamp the attention output
                    # (at 0.1 the top-1 token barely changes along the sequence).
                    param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    _save_tokenizer(tok_dir, out_dir, tokenizer)
    return out_dir


# Text whose tokens differ between pre-tokenizers (punctuation glued to words, digit runs,
# whitespace runs, non-ASCII), like the probe llama.cpp's converter hashes.
_PROBE = ("\n \n\n \t\t (normal) 3 33 333 3.3 3...3 I've been 'told he's there, 'RE you sure? "
          "------======= нещо 我想在apple工作1314151天 ```\"\"\"......!!!!!!")

_SHIM_MODULE = "tokenization_aquakv_tiny"
_SHIM_SOURCE = '''"""SmolLM2's tokenizer exactly as tokenizer.json describes it.

transformers 5 gives some model types (qwen2 among them) their own tokenizer class, which
rebuilds the pre-tokenizer from hard-coded rules instead of reading tokenizer.json; the
tiny test models borrow SmolLM2's tokenizer, so they name this plain class instead.
"""

from transformers import TokenizersBackend


class AquaKVTinyTokenizer(TokenizersBackend):
    """TokenizersBackend under a name of its own, so tokenizer.json is loaded unchanged."""
'''


def _save_tokenizer(tok_dir: Path, out_dir: Path, reference: Any) -> None:
    """Copy the saved tokenizer files into the model folder and make sure that
    ``AutoTokenizer.from_pretrained(out_dir)`` (what llama.cpp's converter calls) tokenizes
    exactly as SmolLM2 does.

    transformers 5 maps qwen2 configs to ``Qwen2Tokenizer`` whatever tokenizer_config.json
    names; that class imposes Qwen's pre-tokenizer on SmolLM2's vocabulary, giving a token
    stream the converter's pre-tokenizer table does not know ("BPE pre-tokenizer was not
    recognized"). For such model types transformers ignores a tokenizer ``auto_map`` unless
    remote code is trusted and then honours tokenizer_config.json's ``tokenizer_class``;
    an ``auto_map`` to a one-line subclass of ``TokenizersBackend`` (shipped beside it, so
    trusting remote code works too) therefore restores SmolLM2's own tokenization.
    """
    from transformers import AutoTokenizer

    for name in os.listdir(tok_dir):
        if name != "ok":
            shutil.copy2(tok_dir / name, out_dir / name)
    expected = reference.encode(_PROBE)
    if AutoTokenizer.from_pretrained(str(out_dir)).encode(_PROBE) == expected:
        return
    (out_dir / f"{_SHIM_MODULE}.py").write_text(_SHIM_SOURCE, encoding="utf-8")
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoTokenizer": [None, f"{_SHIM_MODULE}.AquaKVTinyTokenizer"]}
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    loaded = AutoTokenizer.from_pretrained(str(out_dir))
    if loaded.encode(_PROBE) != expected:
        raise RuntimeError(
            f"transformers loads the tokenizer saved in {out_dir} as {type(loaded).__name__}, "
            "which does not tokenize like SmolLM2; llama.cpp's converter would reject it")


__all__ = ["ARCHITECTURES", "build_tiny_hf_model", "convert_hf_to_gguf",
           "smollm2_tokenizer_dir"]
