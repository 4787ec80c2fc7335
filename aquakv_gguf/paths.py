"""Where the built llama.cpp binaries, libraries and the pinned tree's Python live.

One lookup for every consumer: the installed wheel keeps everything under
``aquakv_gguf/_native`` (``bin/``, ``lib/``, ``py/``); ``AQUAKV_NATIVE_DIR`` overrides it.
When the package is imported from a source checkout that has no ``_native`` folder,
the installed distribution's copy is used, so ``python -m aquakv_gguf...`` works from
the repository root after ``pip install .``.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
DIST_NAME = "aquakv-gguf"


class NativeNotBuiltError(RuntimeError):
    """The patched llama.cpp has not been built or installed."""


def _installed_native_dir() -> Path | None:
    try:
        dist = metadata.distribution(DIST_NAME)
    except metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file("aquakv_gguf/_native"))
    return path if path.is_dir() else None


def native_dir() -> Path:
    """Folder holding ``bin/``, ``lib/`` and ``py/`` of the built llama.cpp."""
    env = os.environ.get("AQUAKV_NATIVE_DIR")
    if env:
        path = Path(env)
        if not path.is_dir():
            raise NativeNotBuiltError(f"AQUAKV_NATIVE_DIR={env} is not a folder")
        return path
    local = PACKAGE_DIR / "_native"
    if local.is_dir():
        return local
    installed = _installed_native_dir()
    if installed is not None:
        return installed
    raise NativeNotBuiltError(
        "the patched llama.cpp is not built: run `pip install .` in the repository "
        "(or set AQUAKV_NATIVE_DIR to a folder with bin/ and lib/)")


def lib_dir() -> Path:
    return native_dir() / "lib"


def libllama_path() -> Path:
    names = {"darwin": "libllama.dylib", "win32": "llama.dll"}
    path = lib_dir() / names.get(sys.platform, "libllama.so")
    if not path.exists():
        raise NativeNotBuiltError(f"{path} is missing: the native build is incomplete")
    return path


def tool_path(name: str) -> Path:
    """Path of a built llama.cpp tool, e.g. ``tool_path("llama-server")``."""
    path = native_dir() / "bin" / name
    if not path.exists():
        available = sorted(p.name for p in (native_dir() / "bin").glob("llama-*"))
        raise NativeNotBuiltError(f"tool {name} is not built (have: {', '.join(available) or 'none'})")
    return path


def llama_cpp_py_dir() -> Path:
    """Folder with the pinned tree's ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/``.

    Prefers the copy installed with the wheel; falls back to ``AQUAKV_LLAMA_CPP_DIR`` or the
    unpacked ``third_party/llama.cpp`` of a source checkout.
    """
    candidates = []
    try:
        candidates.append(native_dir() / "py")
    except NativeNotBuiltError:
        pass
    env = os.environ.get("AQUAKV_LLAMA_CPP_DIR")
    if env:
        candidates.append(Path(env))
    candidates.append(REPO_DIR / "third_party" / "llama.cpp")
    for path in candidates:
        if (path / "convert_hf_to_gguf.py").exists():
            return path
    raise NativeNotBuiltError(
        "convert_hf_to_gguf.py of the pinned llama.cpp was not found: run `pip install .` "
        "or `python third_party/fetch_llama_cpp.py`")
