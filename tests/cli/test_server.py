"""llama-server from the installed package starts on loopback, answers, and stops cleanly."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

from aquakv_gguf.server import server_command
from aquakv_gguf.testing.gpu import test_n_gpu_layers

NGL = test_n_gpu_layers()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, payload: dict | None = None, timeout: float = 60.0) -> tuple[int, dict]:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}


@contextmanager
def server(model, tmp_path, *args: str, stop_timeout: float = 60.0):
    """Start llama-server from the package on a free loopback port; yield (base URL, log path).

    On exit: SIGINT, then the server must stop within ``stop_timeout`` s with status 0.
    """
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "aquakv_gguf.server", str(model), "--port", str(port), "-t", "2",
                             "-ngl", str(NGL), *args], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if http(base + "/health", timeout=5)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.time() < deadline, "server did not become healthy"
            time.sleep(0.5)
        yield base, log_path
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"llama-server did not stop within {stop_timeout:.0f} s of SIGINT") from None
        log.close()
    assert rc == 0, log_path.read_text()[-3000:]


def test_server_health_completion_and_clean_stop(tiny_llama_gguf, tmp_path):
    with server(tiny_llama_gguf, tmp_path, "-c", "512", "-np", "1", stop_timeout=30) as (base, _):
        status, body = http(base + "/completion", {"prompt": "Once upon a time", "n_predict": 8,
                                                   "temperature": 0, "cache_prompt": False})
        assert status == 200
        assert body["tokens_predicted"] == 8
        assert isinstance(body["content"], str) and body["content"]
        assert listening_addresses(int(base.rsplit(":", 1)[1])) == {"127.0.0.1"}


def listening_addresses(port: int) -> set[str]:
    """IPv4/IPv6 addresses with a socket listening on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            if len(addr) == 8:
                found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
            else:
                words = [bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, 32, 8)]
                found.add(socket.inet_ntop(socket.AF_INET6, b"".join(words)))
    return found


def test_server_command_defaults_to_loopback(tiny_llama_gguf):
    cmd = server_command(str(tiny_llama_gguf), [])
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    cmd = server_command(str(tiny_llama_gguf), ["--host", "0.0.0.0", "--port", "9999"])
    assert cmd.count("--host") == 1 and cmd[cmd.index("--host") + 1] == "0.0.0.0"


def test_server_missing_model_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "aquakv_gguf.server", str(tmp_path / "nope.gguf")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "model file not found" in res.stderr
