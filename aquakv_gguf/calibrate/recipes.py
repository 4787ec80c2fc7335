"""Per-architecture recipes (``convert/<name>.toml``): where the pre-RoPE keys and the values
come from, whether llama.cpp permutes Q/K rows, and the calibration defaults.

A new model family is a new TOML file; nothing here names an architecture.  Recipes are looked
up in ``$AQUAKV_RECIPES_DIR``, then ``aquakv_gguf/_recipes`` (an installed wheel), then the
``convert/`` folder of a source checkout.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from aquakv_gguf.paths import PACKAGE_DIR, REPO_DIR

from .errors import UnsupportedModelError

HF_ROPE_STYLES = ("rotate_half",)


@dataclass(frozen=True)
class Recipe:
    """One ``convert/<name>.toml``.

    layers: path of the decoder-layer list in the ``*ForCausalLM`` module; key/value: module
    paths inside one layer whose outputs are the pre-RoPE key (``[B, T, C]`` or
    ``[B, T, H, D]``) and the value (``[B, T, C]``); rotary: path of the rotary-embedding module
    (``rotary(x, position_ids) -> (cos, sin)``).
    """

    name: str
    description: str
    hf_model_types: tuple[str, ...]
    gguf_archs: tuple[str, ...]
    converts_to: str
    layers: str
    key: str
    value: str
    rotary: str
    hf_rope_style: str
    llama_cpp_permutes_qk: bool
    calib_tokens: int
    calib_tokens_per_channel: int
    calib_seq_len: int
    calib_batch_size: int
    reg: float
    heldout_fraction: float
    path: Path

    def default_calib_tokens(self, n_kv_channels: int) -> int:
        """Calibration tokens when none are asked for: ``tokens``, or ``tokens_per_channel · C``
        when that is more.

        A value predictor has 2C inputs; its ridge fit's excess held-out error is about
        2C / n_train, so a fixed number of tokens per channel keeps that excess (~0.8% at 256)
        the same for small and large models instead of over-calibrating small ones.
        """
        return max(self.calib_tokens, self.calib_tokens_per_channel * int(n_kv_channels))


def recipes_dir() -> Path:
    """The folder the recipes are read from."""
    env = os.environ.get("AQUAKV_RECIPES_DIR")
    candidates = ([Path(env)] if env else []) + [PACKAGE_DIR / "_recipes", REPO_DIR / "convert"]
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("*.toml")):
            return folder
    raise UnsupportedModelError("no architecture recipes found (expected convert/*.toml or $AQUAKV_RECIPES_DIR)")


def _req(table: dict[str, Any], key: str, typ: type | tuple[type, ...], path: Path) -> Any:
    if key not in table:
        raise UnsupportedModelError(f"recipe {path}: missing key {key!r}")
    value = table[key]
    if not isinstance(value, typ):
        raise UnsupportedModelError(f"recipe {path}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Parse and check one recipe file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UnsupportedModelError(f"recipe {path}: {exc}") from exc
    match = _req(data, "match", dict, path)
    modules = _req(data, "modules", dict, path)
    rope = _req(data, "rope", dict, path)
    calib = _req(data, "calibration", dict, path)
    recipe = Recipe(
        name=_req(data, "name", str, path),
        description=data.get("description", ""),
        hf_model_types=tuple(_req(match, "hf_model_types", list, path)),
        gguf_archs=tuple(_req(match, "gguf_archs", list, path)),
        converts_to=_req(match, "converts_to", str, path),
        layers=_req(modules, "layers", str, path),
        key=_req(modules, "key", str, path),
        value=_req(modules, "value", str, path),
        rotary=_req(modules, "rotary", str, path),
        hf_rope_style=_req(rope, "hf_style", str, path),
        llama_cpp_permutes_qk=_req(rope, "llama_cpp_permutes_qk", bool, path),
        calib_tokens=_req(calib, "tokens", int, path),
        calib_tokens_per_channel=_req(calib, "tokens_per_channel", int, path) if "tokens_per_channel" in calib else 0,
        calib_seq_len=_req(calib, "seq_len", int, path),
        calib_batch_size=_req(calib, "batch_size", int, path),
        reg=float(_req(calib, "reg", (int, float), path)),
        heldout_fraction=float(_req(calib, "heldout_fraction", (int, float), path)),
        path=path,
    )
    if recipe.hf_rope_style not in HF_ROPE_STYLES:
        raise UnsupportedModelError(f"recipe {path}: rope.hf_style {recipe.hf_rope_style!r} is not one of {HF_ROPE_STYLES}")
    if (not 0 < recipe.heldout_fraction < 1 or recipe.calib_seq_len < 8 or recipe.calib_tokens <= 0
            or recipe.calib_tokens_per_channel < 0):
        raise UnsupportedModelError(f"recipe {path}: calibration settings out of range")
    return recipe


@functools.cache
def _all_recipes(folder: Path) -> tuple[Recipe, ...]:
    return tuple(load_recipe(p) for p in sorted(folder.glob("*.toml")))


def all_recipes() -> tuple[Recipe, ...]:
    """Every recipe, sorted by file name."""
    return _all_recipes(recipes_dir())


def _supported() -> str:
    return ", ".join(sorted({t for r in all_recipes() for t in r.hf_model_types}))


def recipe_for_hf_config(config: Any) -> Recipe:
    """The recipe of a transformers config; refuses sliding-window and hybrid layouts."""
    model_type = getattr(config, "model_type", None)
    for recipe in all_recipes():
        if model_type in recipe.hf_model_types:
            break
    else:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r} (supported: {_supported()}; a new family needs a recipe in convert/)")
    check_full_attention(config)
    return recipe


def check_full_attention(config: Any) -> None:
    """AQUA-KV's cross-layer predictors need every layer to keep every token: refuse SWA/hybrids."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise UnsupportedModelError(
                f"{config.model_type}: layers of type {', '.join(other)} (sliding-window or hybrid attention) "
                "are not supported by AQUA-KV")
    window = getattr(config, "sliding_window", None)
    if window:
        raise UnsupportedModelError(
            f"{config.model_type}: sliding-window attention (sliding_window={window}) is not supported by AQUA-KV")
    for attr in ("attention_chunk_size", "num_experts", "linear_num_key_heads", "kv_lora_rank"):
        if getattr(config, attr, None):
            raise UnsupportedModelError(f"{config.model_type}: {attr} set: not a dense full-attention model")


def recipe_for_gguf_arch(arch: str) -> Recipe:
    """The recipe of a GGUF's general.architecture (the first recipe listing it)."""
    for recipe in all_recipes():
        if arch in recipe.gguf_archs:
            return recipe
    archs = ", ".join(sorted({a for r in all_recipes() for a in r.gguf_archs}))
    raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r} (supported: {archs}; add a recipe in convert/)")
