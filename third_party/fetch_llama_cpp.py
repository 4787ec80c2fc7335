#!/usr/bin/env python3
"""Fetch the pinned llama.cpp tree from the llama-cpp-python sdist.

The sdist is downloaded with pip (by package name), checked against the sha256 in
``llama.cpp.lock``, cached outside the repository, and only its ``vendor/llama.cpp``
member is unpacked into ``third_party/llama.cpp`` (git-ignored).  Standard library
only: this runs inside CMake's configure step and on fresh machines.

Usage: python third_party/fetch_llama_cpp.py [--dest DIR] [--print-dir]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCK_FILE = HERE / "llama.cpp.lock"
DEFAULT_DEST = HERE / "llama.cpp"
STAMP_NAME = ".aquakv-source"


class FetchError(RuntimeError):
    """The pinned source could not be obtained or did not verify."""


def read_lock() -> dict[str, str]:
    with LOCK_FILE.open("rb") as f:
        return tomllib.load(f)["llama_cpp"]


def cache_dir() -> Path:
    base = os.environ.get("AQUAKV_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "aquakv"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_archive(lock: dict[str, str], dest_dir: Path) -> Path:
    """pip-download the sdist into dest_dir (no dependencies, no wheel)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    spec = f"{lock['package']}=={lock['version']}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", lock["package"],
           "--no-build-isolation", "--disable-pip-version-check", "-d", str(dest_dir), spec]
    print(f"[aquakv] downloading {spec} sdist with pip ...", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FetchError(f"pip could not download {spec}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    path = dest_dir / lock["archive"]
    if not path.exists():
        raise FetchError(f"pip finished but {path} is missing (got: {sorted(p.name for p in dest_dir.iterdir())})")
    print(f"[aquakv] downloaded in {time.time() - t0:.1f}s", flush=True)
    return path


def cached_archive(lock: dict[str, str]) -> Path:
    """Return a verified archive from the cache, downloading it when absent or corrupt."""
    sdist_dir = cache_dir() / "sdist"
    path = sdist_dir / lock["archive"]
    if path.exists() and sha256_of(path) == lock["sha256"]:
        return path
    if path.exists():
        print(f"[aquakv] cached {path} has the wrong sha256: fetching it again", flush=True)
        path.unlink()
    with tempfile.TemporaryDirectory(dir=sdist_dir.parent if sdist_dir.parent.exists() else None) as tmp:
        got = download_archive(lock, Path(tmp))
        digest = sha256_of(got)
        if digest != lock["sha256"]:
            raise FetchError(f"{got.name}: sha256 {digest} does not match the lock's {lock['sha256']}")
        sdist_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(str(got), path)
    return path


def unpack(archive: Path, member: str, dest: Path, digest: str) -> None:
    """Unpack only ``<top>/<member>/`` of the sdist into dest, atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=dest.parent))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            prefix = None
            members = []
            for info in tar.getmembers():
                parts = info.name.split("/", 1)
                if len(parts) < 2:
                    continue
                if prefix is None and parts[1].startswith(member + "/"):
                    prefix = parts[0] + "/" + member + "/"
                if prefix and info.name.startswith(prefix):
                    info.name = info.name[len(prefix):]
                    if info.name:
                        members.append(info)
            if not members:
                raise FetchError(f"{archive.name} has no {member}/ member")
            tar.extractall(tmp, members=members, filter="data")
        (tmp / STAMP_NAME).write_text(digest + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_tree(dest: Path = DEFAULT_DEST) -> Path:
    """Make sure ``dest`` holds the pinned tree; return it."""
    lock = read_lock()
    stamp = dest / STAMP_NAME
    if stamp.exists() and stamp.read_text().strip() == lock["sha256"]:
        return dest
    archive = cached_archive(lock)
    t0 = time.time()
    unpack(archive, lock["member"], dest, lock["sha256"])
    print(f"[aquakv] unpacked {lock['member']} (llama.cpp {lock['upstream_commit']}) into {dest} "
          f"in {time.time() - t0:.1f}s", flush=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    ap.add_argument("--print-dir", action="store_true", help="print the tree's path on stdout")
    args = ap.parse_args(argv)
    try:
        path = ensure_tree(args.dest.resolve())
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.print_dir:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
