"""Write one benchmark's section of docs/RESULTS.md.

Every benchmark owns a section delimited by HTML comments, so scripts can rewrite
their own tables without touching the others'.  Each section records the command,
the machine and the date it was produced on.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "RESULTS.md"
HEADER = "# Results\n\nEvery section below is written by a script under `bench/`; rerun it to refresh.\n"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}"


def write_section(name: str, title: str, body: str, *, command: str | None = None,
                  machine: str | None = None, path: Path = RESULTS) -> None:
    """Replace (or append) section ``name`` of RESULTS.md, atomically."""
    command = command or "python " + " ".join(shlex.quote(a) for a in sys.argv)
    machine = machine or machine_description()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = (f"{begin}\n## {title}\n\n- command: `{command}`\n- machine: {machine}\n- date: {stamp}\n\n"
             f"{body.rstrip()}\n{end}\n")
    text = path.read_text() if path.exists() else HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".RESULTS-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; RESULTS.md is a normal, readable file
    os.replace(tmp, path)
