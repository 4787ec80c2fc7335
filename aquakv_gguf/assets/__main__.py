"""``python -m aquakv_gguf.assets``: fetch (if needed) and describe the model and texts."""

from __future__ import annotations

import sys
import time

from . import AssetError, austen_books, cache_dir, calibration_text, evaluation_text, smollm2_gguf
from .austen import _text_file


def main() -> int:
    print(f"cache: {cache_dir()}")
    try:
        start = time.perf_counter()
        model = smollm2_gguf()
        print(f"model: {model} ({model.stat().st_size:,} bytes, sha256 verified, "
              f"{time.perf_counter() - start:.2f} s)")
        start = time.perf_counter()
        books = austen_books()
        elapsed = time.perf_counter() - start
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for title, text in books.items():
        path = _text_file(title)
        print(f"book: {title:<22} {len(text):>9,} chars  {path} ({path.stat().st_size:,} bytes)")
    print(f"books loaded in {elapsed:.2f} s")
    print(f"calibration text: {len(calibration_text()):,} chars; "
          f"evaluation text: {len(evaluation_text()):,} chars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
