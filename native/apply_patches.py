#!/usr/bin/env python3
"""Apply our hook patches (``native/patches/*.patch``) to a llama.cpp tree, idempotently.

A hook patch is a plain unified diff with paths relative to the tree root.  Each hunk
is applied where its context matches exactly (searching outward from the stated line);
a hunk whose result is already present counts as applied, so running this twice is a
no-op.  A hunk that matches neither way aborts with the file and hunk named, and no
file is changed (all hunks of all patches are checked before anything is written).

Standard library only: this runs inside CMake's configure step.
Usage: python native/apply_patches.py TREE [--check]
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

PATCH_DIR = Path(__file__).resolve().parent / "patches"
HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(RuntimeError):
    """A hook patch does not apply to the tree."""


@dataclass
class Hunk:
    old_start: int
    old_lines: list[str] = field(default_factory=list)
    new_lines: list[str] = field(default_factory=list)


@dataclass
class FilePatch:
    path: str
    hunks: list[Hunk] = field(default_factory=list)


def parse_patch(text: str, source: str) -> list[FilePatch]:
    files: list[FilePatch] = []
    hunk: Hunk | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.startswith("--- "):
            hunk = None
            continue
        if line.startswith("+++ "):
            path = line[4:].split("\t")[0].strip()
            files.append(FilePatch(path[2:] if path.startswith("b/") else path))
            continue
        m = HUNK_RE.match(line)
        if m:
            if not files:
                raise PatchError(f"{source}:{lineno}: hunk before any file header")
            hunk = Hunk(int(m.group(1)))
            files[-1].hunks.append(hunk)
            continue
        if hunk is None:
            continue
        tag, body = line[:1], line[1:]
        if tag == " " or line == "":
            hunk.old_lines.append(body)
            hunk.new_lines.append(body)
        elif tag == "-":
            hunk.old_lines.append(body)
        elif tag == "+":
            hunk.new_lines.append(body)
        elif tag == "\\":
            continue
        else:
            raise PatchError(f"{source}:{lineno}: unexpected line in hunk: {line!r}")
    return files


def find_block(lines: list[str], block: list[str], near: int) -> int:
    """Index of ``block`` in ``lines`` closest to ``near``, or -1."""
    n = len(block)
    hits = [i for i in range(len(lines) - n + 1) if lines[i:i + n] == block]
    return min(hits, key=lambda i: abs(i - near)) if hits else -1


def patch_lines(lines: list[str], fp: FilePatch, source: str) -> bool:
    """Apply ``fp``'s hunks to ``lines`` in place; False when all were already present."""
    changed = False
    for k, hunk in enumerate(fp.hunks, 1):
        at = find_block(lines, hunk.old_lines, hunk.old_start - 1)
        if at >= 0:
            lines[at:at + len(hunk.old_lines)] = hunk.new_lines
            changed = True
            continue
        if find_block(lines, hunk.new_lines, hunk.old_start - 1) >= 0:
            continue  # this hunk is already in place
        raise PatchError(f"{source}: hunk {k} (@@ -{hunk.old_start}) does not apply to {fp.path}: "
                         f"its context was not found; the tree is not the pinned llama.cpp or was edited")
    return changed


def apply_all(tree: Path, patches: list[Path], check_only: bool = False) -> list[str]:
    """Apply ``patches`` to ``tree`` in order; return the files that changed (or would)."""
    if not (tree / "CMakeLists.txt").exists():
        raise PatchError(f"{tree} is not a llama.cpp tree (no CMakeLists.txt)")
    contents: dict[Path, list[str]] = {}
    changed: set[Path] = set()
    for patch in patches:
        for fp in parse_patch(patch.read_text(), patch.name):
            path = tree / fp.path
            if path not in contents:
                if not path.exists():
                    raise PatchError(f"{patch.name}: {fp.path} does not exist in {tree}")
                contents[path] = path.read_text().split("\n")
            if patch_lines(contents[path], fp, patch.name):
                changed.add(path)
    if not check_only:
        for path in sorted(changed):
            tmp = path.with_name(path.name + ".aquakv-tmp")
            tmp.write_text("\n".join(contents[path]))
            tmp.replace(path)
    return [str(p.relative_to(tree)) for p in sorted(changed)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tree", type=Path)
    ap.add_argument("--check", action="store_true", help="only report what would change")
    args = ap.parse_args(argv)
    patches = sorted(PATCH_DIR.glob("*.patch"))
    try:
        changed = apply_all(args.tree.resolve(), patches, check_only=args.check)
    except PatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    verb = "would patch" if args.check else "patched"
    print(f"[aquakv] {verb} {len(changed)} file(s) of {args.tree}: {', '.join(changed) or 'already applied'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
