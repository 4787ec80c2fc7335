"""Errors of the GGUF reader/writer."""


class AquaKVFormatError(ValueError):
    """A GGUF file is unreadable, truncated, or its aquakv.* data are missing or inconsistent."""
