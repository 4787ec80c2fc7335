"""Start the patched llama-server: ``python -m aquakv_gguf.server MODEL [llama-server args]``.

MODEL is a GGUF file or ``smollm2`` (the embedded model). The server listens on
127.0.0.1 unless ``--host`` is given, on port 8080 unless ``--port`` is given; every other
argument goes to llama-server unchanged. The process becomes llama-server (exec), so
Ctrl-C and signals stop it exactly as they stop llama-server.
"""

from __future__ import annotations

import os
import sys

from aquakv_gguf.cli.common import fail, resolve_model_path
from aquakv_gguf.paths import NativeNotBuiltError, tool_path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def server_command(model: str, extra: list[str]) -> list[str]:
    """The llama-server argv for MODEL plus the user's extra arguments."""
    argv = [str(tool_path("llama-server")), "-m", str(resolve_model_path(model))]
    if "--host" not in extra:
        argv += ["--host", DEFAULT_HOST]
    if "--port" not in extra:
        argv += ["--port", str(DEFAULT_PORT)]
    return argv + extra


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    try:
        cmd = server_command(args[0], args[1:])
    except (FileNotFoundError, NativeNotBuiltError) as e:
        return fail(e)
    print(f"[aquakv] exec {' '.join(cmd)}", file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
