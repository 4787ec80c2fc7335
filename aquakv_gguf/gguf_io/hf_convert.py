"""Hugging Face folder -> GGUF with the pinned llama.cpp's own ``convert_hf_to_gguf.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def convert_hf_to_gguf(hf_dir: Path, out_path: Path, *, outtype: str = "f32") -> Path:
    """Convert the Hugging Face folder ``hf_dir`` to GGUF at ``out_path`` with the pinned
    llama.cpp's ``convert_hf_to_gguf.py`` (run as a subprocess in its own tree, so it uses
    that tree's gguf-py). The file appears only when the conversion succeeded."""
    from aquakv_gguf import paths

    tree = paths.llama_cpp_py_dir()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(Path(hf_dir).resolve()),
           "--outfile", str(tmp), "--outtype", outtype]
    env = dict(os.environ)
    # The converter needs its own tree's gguf-py (the released gguf lacks symbols it uses).
    env.pop("NO_LOCAL_GGUF", None)
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-25:])
            raise RuntimeError(f"convert_hf_to_gguf.py failed on {hf_dir} "
                               f"(exit {proc.returncode}):\n{tail}")
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path
