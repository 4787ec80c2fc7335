"""The pinned llama.cpp source: hash-checked archive, only vendor/llama.cpp unpacked."""

from __future__ import annotations

import importlib.util
import io
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("fetch_llama_cpp", REPO / "third_party" / "fetch_llama_cpp.py")
fetch = importlib.util.module_from_spec(spec)
sys.modules["fetch_llama_cpp"] = fetch
spec.loader.exec_module(fetch)


def make_sdist(path: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in {"pkg-1.0/setup.py": b"x", "pkg-1.0/vendor/llama.cpp/CMakeLists.txt": b"project()\n",
                           "pkg-1.0/vendor/llama.cpp/src/a.c": b"int a;\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_lock_pins_the_design_version():
    lock = fetch.read_lock()
    assert lock["package"] == "llama-cpp-python" and lock["version"] == "0.3.36"
    assert lock["sha256"] == "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"


def test_unpack_takes_only_the_member(tmp_path):
    archive = tmp_path / "pkg.tar.gz"
    make_sdist(archive)
    dest = tmp_path / "out" / "llama.cpp"
    fetch.unpack(archive, "vendor/llama.cpp", dest, "abc")
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        ".aquakv-source", "CMakeLists.txt", "src/a.c"]
    with pytest.raises(fetch.FetchError, match="no vendor/missing/ member"):
        fetch.unpack(archive, "vendor/missing", tmp_path / "other", "abc")
    assert not (tmp_path / "other").exists()


def test_corrupt_cached_archive_is_not_used(tmp_path, monkeypatch):
    lock = fetch.read_lock()
    monkeypatch.setenv("AQUAKV_CACHE_DIR", str(tmp_path))
    (tmp_path / "sdist").mkdir()
    (tmp_path / "sdist" / lock["archive"]).write_bytes(b"not the archive")

    def fake_download(lock, dest_dir):
        bad = dest_dir / lock["archive"]
        bad.write_bytes(b"still not the archive")
        return bad

    monkeypatch.setattr(fetch, "download_archive", fake_download)
    with pytest.raises(fetch.FetchError, match="does not match the lock"):
        fetch.cached_archive(lock)
    assert not (tmp_path / "sdist" / lock["archive"]).exists()


def test_pinned_tree_is_ignored_by_git():
    import subprocess
    res = subprocess.run(["git", "check-ignore", "third_party/llama.cpp/CMakeLists.txt"], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0
