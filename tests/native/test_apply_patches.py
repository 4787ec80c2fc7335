"""Our hook patches apply to the pinned tree, idempotently, and fail loudly otherwise."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "native" / "apply_patches.py"
spec = importlib.util.spec_from_file_location("apply_patches", SCRIPT)
ap = importlib.util.module_from_spec(spec)
sys.modules["apply_patches"] = ap
spec.loader.exec_module(ap)

PATCH = """--- a/src/x.c
+++ b/src/x.c
@@ -2,3 +2,4 @@
 int a;
 int b;
+int hook;
 int c;
"""


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "CMakeLists.txt").write_text("project(x)\n")
    (tmp_path / "src" / "x.c").write_text("// x\nint a;\nint b;\nint c;\n")
    patch = tmp_path / "p.patch"
    patch.write_text(PATCH)
    return tmp_path, patch


def test_applies_once_then_is_a_noop(tree):
    root, patch = tree
    assert ap.apply_all(root, [patch]) == ["src/x.c"]
    assert (root / "src" / "x.c").read_text() == "// x\nint a;\nint b;\nint hook;\nint c;\n"
    assert ap.apply_all(root, [patch]) == []
    assert (root / "src" / "x.c").read_text().count("hook") == 1


def test_mismatch_names_file_and_hunk_and_changes_nothing(tree):
    root, patch = tree
    (root / "src" / "x.c").write_text("// x\nint a;\nint B;\nint c;\n")
    before = (root / "src" / "x.c").read_text()
    with pytest.raises(ap.PatchError, match=r"p.patch: hunk 1 \(@@ -2\) does not apply to src/x.c"):
        ap.apply_all(root, [patch])
    assert (root / "src" / "x.c").read_text() == before


def test_missing_file_and_not_a_tree(tree, tmp_path):
    root, patch = tree
    (root / "src" / "x.c").unlink()
    with pytest.raises(ap.PatchError, match="src/x.c does not exist"):
        ap.apply_all(root, [patch])
    with pytest.raises(ap.PatchError, match="not a llama.cpp tree"):
        ap.apply_all(tmp_path / "src", [patch])


def test_real_patches_are_small_and_apply_to_pinned_tree(tmp_path):
    patches = sorted((REPO / "native" / "patches").glob("*.patch"))
    assert patches
    added = sum(1 for p in patches for line in p.read_text().splitlines()
                if line.startswith("+") and not line.startswith("+++"))
    assert added <= 400, "keep upstream hunks small: move logic into native/"
    tree = REPO / "third_party" / "llama.cpp"
    if not tree.exists():
        subprocess.run([sys.executable, str(REPO / "third_party" / "fetch_llama_cpp.py")], check=True)
    # work on a copy of the touched files so the test does not depend on the tree's state
    copy = tmp_path / "tree"
    for fp in (f for p in patches for f in ap.parse_patch(p.read_text(), p.name)):
        (copy / fp.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tree / fp.path, copy / fp.path)
    (copy / "CMakeLists.txt").write_text("")
    ap.apply_all(copy, patches)  # already patched or not: must succeed
    assert ap.apply_all(copy, patches) == []
    assert "llama_aquakv_build_info" in (copy / "include" / "llama.h").read_text()
