"""The one error type of :mod:`aquakv_gguf.assets` (kept apart so helpers can import it)."""

from __future__ import annotations


class AssetError(RuntimeError):
    """A model file or text corpus could not be located, installed, verified or read."""
