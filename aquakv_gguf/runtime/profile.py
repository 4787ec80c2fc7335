"""Per-op time profile of llama.cpp graphs (native/src/aquakv-profile.cpp), for docs/PERF.md.

Contexts created while the environment has ``AQUAKV_PROFILE=1`` compute one node at a time and
synchronize after each, so per-node wall times are measurable; everything runs slower, so use
it to apportion time, not to report speed.

>>> os.environ["AQUAKV_PROFILE"] = "1"
>>> with Model(path, n_gpu_layers=99) as m, m.context(n_ctx=4096) as ctx:
...     ctx.decode(prompt); record(True); ctx.decode([tok]); rows = write("profile.tsv")
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from aquakv_gguf.runtime._ffi import ffi, lib


def record(on: bool = True) -> None:
    """Clear the totals and start (or stop) recording."""
    lib().aquakv_profile_reset(bool(on))


def write(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Save the totals as TSV (op, name, calls, seconds; slowest first) and return its rows."""
    path = Path(path)
    if lib().aquakv_profile_write(ffi.new("char[]", os.fsencode(path))) < 0:
        raise OSError(f"cannot write the profile to {path}")
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))
