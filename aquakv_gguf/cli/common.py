"""Arguments and helpers shared by the command-line entry points."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aquakv_gguf.runtime import Model

EMBEDDED_MODEL_NAMES = ("smollm2", "default")


def resolve_model_path(name: str) -> Path:
    """A GGUF path, or the embedded SmolLM2 for 'smollm2' / 'default'."""
    if name in EMBEDDED_MODEL_NAMES:
        from aquakv_gguf.assets import smollm2_gguf
        return smollm2_gguf()
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    return path


def parse_override(text: str) -> tuple[str, bool | int | float | str]:
    """'key=type:value' (llama.cpp's --override-kv syntax) → (key, typed value)."""
    try:
        key, rest = text.split("=", 1)
        kind, value = rest.split(":", 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected key=type:value, got {text!r}") from None
    if kind == "bool" and value in ("true", "false"):
        return key, value == "true"
    try:
        converters = {"int": int, "float": float, "str": str}
        return key, converters[kind](value)
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"invalid override {text!r}: type is int|float|bool|str") from None


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    ap.add_argument("--override-kv", type=parse_override, action="append", default=[],
                    metavar="KEY=TYPE:VALUE", help="override model metadata, as in llama.cpp")


def add_context_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("-c", "--ctx-size", type=int, default=2048)
    ap.add_argument("-b", "--batch-size", type=int, default=512)
    ap.add_argument("-ub", "--ubatch-size", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-ctk", "--cache-type-k", default="f16")
    ap.add_argument("-ctv", "--cache-type-v", default="f16")
    ap.add_argument("-fa", "--flash-attn", choices=["on", "off", "auto"], default="auto")


def open_model(args: argparse.Namespace) -> Model:
    return Model(resolve_model_path(args.model), n_gpu_layers=args.n_gpu_layers,
                 kv_overrides=dict(args.override_kv))


def context_kwargs(args: argparse.Namespace) -> dict:
    return dict(n_ctx=args.ctx_size, n_batch=args.batch_size, n_ubatch=args.ubatch_size, n_threads=args.threads,
                type_k=args.cache_type_k, type_v=args.cache_type_v, flash_attn=args.flash_attn)


def fail(err: BaseException) -> int:
    """Print a one-line (plus llama.cpp log) error and return the CLI's error status."""
    print(f"error: {err}", file=sys.stderr)
    return 2
