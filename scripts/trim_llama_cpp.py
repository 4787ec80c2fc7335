#!/usr/bin/env python3
"""Copy the pinned llama.cpp tree without what a CPU/CUDA build does not read.

For the GPU machine, whose calls carry at most 64 MiB and which cannot fetch the sdist:
drops docs, models, media, tests, examples, the web UI sources and every ggml backend
but CPU and CUDA. Usage: python scripts/trim_llama_cpp.py SRC DEST
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

KEEP_TOP = {"CMakeLists.txt", "LICENSE", "cmake", "include", "src", "common", "vendor", "gguf-py", "conversion",
            "convert_hf_to_gguf.py", "scripts", "ggml", "tools", "licenses", ".aquakv-source"}
KEEP_BACKENDS = {"ggml-cpu", "ggml-cuda"}
UI_KEEP = {"CMakeLists.txt", "sources.cmake", "ui.cpp.in", "ui.h.in"}


def ignore(dirpath: str, names: list[str]) -> set[str]:
    path = Path(dirpath)
    dropped = {"__pycache__", ".git"}
    if path.name == "src" and path.parent.name == "ggml":
        dropped |= {n for n in names if n.startswith("ggml-") and (path / n).is_dir() and n not in KEEP_BACKENDS}
    if path.name == "ui" and path.parent.name == "tools":
        dropped |= {n for n in names if n not in UI_KEEP}
    if path.name in ("tools", "common", "vendor") or path.parent.name == "tools":
        dropped |= {n for n in names if n in ("tests", "public", "webui", "themes")}
    return dropped & set(names)


def main() -> int:
    src, dest = Path(sys.argv[1]), Path(sys.argv[2])
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for item in sorted(src.iterdir()):
        if item.name not in KEEP_TOP:
            continue
        if item.is_dir():
            shutil.copytree(item, dest / item.name, ignore=ignore)
        else:
            shutil.copy2(item, dest / item.name)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"trimmed tree: {size / 2**20:.1f} MiB in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
