"""Console scripts that run the llama.cpp tools built into this package.

``aquakv-llama-server ARGS`` is ``llama-server ARGS`` from the wheel: the process is
replaced (exec), so signals, exit codes and stdio behave exactly as the tool's own.
"""

from __future__ import annotations

import os
import sys

from aquakv_gguf.paths import NativeNotBuiltError, tool_path


def run_tool(name: str, argv: list[str] | None = None) -> int:
    """Replace this process with the built tool ``name`` given ``argv``."""
    args = sys.argv[1:] if argv is None else argv
    try:
        path = tool_path(name)
    except NativeNotBuiltError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.execv(str(path), [str(path), *args])
    return 0  # not reached


def llama_server() -> int:
    return run_tool("llama-server")


def llama_cli() -> int:
    return run_tool("llama-cli")


def llama_completion() -> int:
    return run_tool("llama-completion")


def llama_perplexity() -> int:
    return run_tool("llama-perplexity")


def llama_bench() -> int:
    return run_tool("llama-bench")


def llama_tokenize() -> int:
    return run_tool("llama-tokenize")


def llama_quantize() -> int:
    return run_tool("llama-quantize")
