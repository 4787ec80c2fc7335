"""Exceptions raised by the bindings, carrying what llama.cpp logged."""

from __future__ import annotations


class LlamaError(RuntimeError):
    """A llama.cpp call failed; ``log`` holds the library's last log lines."""

    def __init__(self, message: str, log: str = "") -> None:
        self.log = log
        tail = "\n".join(log.strip().splitlines()[-15:])
        super().__init__(f"{message}\n--- llama.cpp log (last lines) ---\n{tail}" if tail else message)


class ContextFullError(LlamaError):
    """The KV cache has no room for the batch (llama_decode returned 1)."""
