"""Deterministic ownership of one native llama.cpp object."""

from __future__ import annotations

from typing import Any

from aquakv_gguf.runtime.errors import LlamaError


class NativeHandle:
    """Owns a native pointer: ``close()`` (or leaving a ``with`` block) frees it exactly once.

    Subclasses set ``_handle`` and implement ``_free``; ``handle`` raises once closed, so a
    use-after-close is a Python error rather than a crash.
    """

    _handle: Any = None
    _kind = "object"

    @property
    def handle(self) -> Any:
        if self._handle is None:
            raise LlamaError(f"the {self._kind} is closed")
        return self._handle

    def _free(self, handle: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self._free(handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
