"""The per-user cache folder of :mod:`aquakv_gguf.assets`, file locks and hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import AssetError

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX systems run without inter-process locks
    fcntl = None  # type: ignore[assignment]


def cache_dir() -> Path:
    """Folder for downloaded packages, extracted texts and verification stamps.

    ``$AQUAKV_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/aquakv``, else ``~/.cache/aquakv``;
    created on demand.
    """
    env = os.environ.get("AQUAKV_CACHE_DIR")
    if env:
        path = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
        path = base / "aquakv"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetError(f"cannot create the cache folder {path}: {exc} "
                         "(set AQUAKV_CACHE_DIR to a writable folder)") from exc
    return path


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold an exclusive lock on ``cache_dir()/.NAME.lock`` for the block.

    Several processes (pytest workers, a benchmark and a test run) may fill the cache at
    the same time; the lock makes the second wait for the first instead of racing it.
    """
    path = cache_dir() / f".{name}.lock"
    with open(path, "a+b") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json_atomic(path: Path, data: dict) -> None:
    # Write-then-rename so a reader never sees half a stamp or manifest.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def staged_dir(final: Path, prefix: str) -> Iterator[Path]:
    """Yield an empty sibling folder of ``final``; on success it replaces ``final`` in one rename.

    An interrupted or failed step never leaves a half-written folder where the next call
    would look; the staging folder is removed either way.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        yield staging
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
