"""Jane Austen's six novels from the Debian package ``r-cran-janeaustenr``.

The package ships the public-domain texts as R data (a lazy-load database of character
vectors, one element per line). The ``.deb`` is fetched with ``apt-get download`` and
unpacked with ``dpkg-deb -x`` (no R and no root install needed); :mod:`.rdata` reads the
database, and the texts are cached as UTF-8 ``.txt`` files with a manifest of their hashes,
so later calls read six files and nothing else.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ._cache import cache_dir, locked, read_json, staged_dir, write_json_atomic
from .errors import AssetError
from .rdata import LazyLoadDB, RObject

DEB_PACKAGE = "r-cran-janeaustenr"
DATA_SUBDIR = Path("usr/lib/R/site-library/janeaustenr/data")
SYSTEM_DATA_DIRS = (Path("/usr/lib/R/site-library/janeaustenr/data"),
                    Path("/usr/local/lib/R/site-library/janeaustenr/data"))

# R object name in the package -> the title used everywhere in this project.
BOOKS: dict[str, str] = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}
CALIBRATION_TITLES = ("Emma", "Mansfield Park", "Northanger Abbey", "Persuasion",
                      "Sense and Sensibility")
EVALUATION_TITLE = "Pride and Prejudice"

_MANIFEST_VERSION = 1
_INSTALL_HINT = (f"install it with `apt-get update && apt-get install {DEB_PACKAGE}` "
                 "(its R data is read directly; R itself is not needed)")


def _extract_root() -> Path:
    return cache_dir() / "janeaustenr"


def _texts_dir() -> Path:
    return cache_dir() / "austen"


def _text_file(title: str) -> Path:
    return _texts_dir() / (title.lower().replace(" ", "_") + ".txt")


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _load_cached() -> dict[str, str] | None:
    """The cached texts if every one is present and matches the manifest, else None."""
    manifest = read_json(_texts_dir() / "manifest.json")
    if not manifest or manifest.get("version") != _MANIFEST_VERSION:
        return None
    entries = manifest.get("books")
    if not isinstance(entries, dict) or set(entries) != set(BOOKS.values()):
        return None
    books: dict[str, str] = {}
    for title in BOOKS.values():
        try:
            # newline="" keeps the text byte-exact, as the manifest's hash was taken.
            with open(_text_file(title), encoding="utf-8", newline="") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError):
            return None
        # A damaged or edited cache must not leak into calibration or evaluation silently.
        if _sha256_text(text) != entries[title].get("sha256"):
            return None
        books[title] = text
    return books


def _store(books: dict[str, str]) -> None:
    folder = _texts_dir()
    folder.mkdir(parents=True, exist_ok=True)
    entries = {}
    for title, text in books.items():
        path = _text_file(title)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8", newline="")
        os.replace(tmp, path)
        entries[title] = {"file": path.name, "sha256": _sha256_text(text), "chars": len(text)}
    # The manifest goes last: it is what marks the set complete.
    write_json_atomic(folder / "manifest.json", {"version": _MANIFEST_VERSION,
                                                 "source": DEB_PACKAGE, "books": entries})


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise AssetError(f"cannot run `{cmd[0]}` ({exc}) to fetch the Jane Austen texts: "
                         f"{_INSTALL_HINT}") from exc


def _tail(proc: subprocess.CompletedProcess[str]) -> str:
    return "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-10:])


def _download_deb(folder: Path) -> Path:
    """``apt-get download`` the package into ``folder``; refresh the lists once if needed."""
    if shutil.which("apt-get") is None:
        raise AssetError(f"apt-get was not found, so {DEB_PACKAGE} cannot be fetched; "
                         f"on a Debian-like system {_INSTALL_HINT}")
    proc = _run(["apt-get", "download", DEB_PACKAGE], cwd=folder)
    if proc.returncode != 0:
        # A fresh machine often has no package lists yet: update once, then try again.
        update = _run(["apt-get", "update"])
        if update.returncode == 0:
            proc = _run(["apt-get", "download", DEB_PACKAGE], cwd=folder)
    debs = sorted(folder.glob(f"{DEB_PACKAGE}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise AssetError(f"`apt-get download {DEB_PACKAGE}` failed; {_INSTALL_HINT}. "
                         f"apt-get said:\n{_tail(proc)}")
    return debs[-1]


def _extract_deb(deb: Path, dest: Path) -> None:
    """``dpkg-deb -x`` into a staging folder, then rename it to ``dest`` in one step."""
    if shutil.which("dpkg-deb") is None:
        raise AssetError(f"dpkg-deb was not found, so {deb.name} cannot be unpacked; "
                         f"{_INSTALL_HINT}")
    with staged_dir(dest, ".janeaustenr-") as staging:
        proc = _run(["dpkg-deb", "-x", str(deb), str(staging)])
        if proc.returncode != 0:
            raise AssetError(f"`dpkg-deb -x {deb.name}` failed: {_tail(proc)}")


def _data_dir(*, fetch: bool) -> Path:
    """Folder holding ``Rdata.rdb``/``Rdata.rdx``: a system install or our unpacked copy, or,
    when ``fetch`` is true, a freshly downloaded and unpacked copy."""
    if not fetch:
        for folder in (*SYSTEM_DATA_DIRS, _extract_root() / DATA_SUBDIR):
            if (folder / "Rdata.rdb").is_file() and (folder / "Rdata.rdx").is_file():
                return folder
        raise AssetError(f"{DEB_PACKAGE} is neither installed nor unpacked in {_extract_root()}")
    with tempfile.TemporaryDirectory(prefix="janeaustenr-deb-") as tmp:
        deb = _download_deb(Path(tmp))
        _extract_deb(deb, _extract_root())
    folder = _extract_root() / DATA_SUBDIR
    if not (folder / "Rdata.rdb").is_file():
        raise AssetError(f"{DEB_PACKAGE} unpacked into {_extract_root()} has no {DATA_SUBDIR}/Rdata.rdb")
    return folder


def _read_books(folder: Path) -> dict[str, str]:
    db = LazyLoadDB(folder / "Rdata.rdb", folder / "Rdata.rdx")
    missing = [name for name in BOOKS if name not in db.names]
    if missing:
        raise AssetError(f"{folder}/Rdata.rdb lacks {', '.join(missing)} (has {', '.join(db.names)})")
    books: dict[str, str] = {}
    for name, title in BOOKS.items():
        obj = db.get(name)
        if not isinstance(obj, RObject) or obj.kind != "character":
            kind = obj.kind if isinstance(obj, RObject) else type(obj).__name__
            raise AssetError(f"janeaustenr's {name} is an R {kind}, expected a character vector")
        # One element per printed line; NA lines (none are expected) become empty lines.
        books[title] = "\n".join("" if line is None else line for line in obj.value)
    return books


def austen_books() -> dict[str, str]:
    """The six novels by title: Emma, Mansfield Park, Northanger Abbey, Persuasion,
    Pride and Prejudice, Sense and Sensibility.

    The first call fetches and unpacks ``r-cran-janeaustenr`` (unless it is installed) and
    caches the texts; later calls read the cache, whose hashes are checked every time. A
    damaged cache is rebuilt from the unpacked package (fetched again if that is gone too).
    """
    books = _load_cached()
    if books is not None:
        return books
    with locked("austen"):
        books = _load_cached()
        if books is not None:
            return books
        try:
            books = _read_books(_data_dir(fetch=False))
        except AssetError:
            # Missing or damaged unpacked copy: unpack a fresh one and read that.
            shutil.rmtree(_extract_root(), ignore_errors=True)
            books = _read_books(_data_dir(fetch=True))
        _store(books)
        return dict(books)


def calibration_text() -> str:
    """Emma, Mansfield Park, Northanger Abbey, Persuasion and Sense and Sensibility, in that
    order, separated by a blank line. Never contains Pride and Prejudice (the evaluation text)."""
    books = austen_books()
    return "\n\n".join(books[title].strip("\n") for title in CALIBRATION_TITLES)


def evaluation_text() -> str:
    """Pride and Prejudice, the held-out evaluation text."""
    return austen_books()[EVALUATION_TITLE]
