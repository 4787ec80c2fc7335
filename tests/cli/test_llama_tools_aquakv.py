"""The shipped llama.cpp tools run a model.aqua.gguf with the AQUA-KV cache, and switch it off on request.

llama-completion, llama-cli, llama-bench and llama-perplexity (--kl-divergence) from the wheel; the
cache announces itself in the verbose startup log with its sizes and bits per value.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from aquakv_gguf.paths import tool_path
from aquakv_gguf.testing.gpu import test_n_gpu_layers

NGL = str(test_n_gpu_layers())
BANNER = re.compile(r"AQUA-KV cache: \d+ cells x \d+ streams, \d+ layers, C = \d+: codes\+scales [0-9.]+ MiB, "
                    r"f16 window [0-9.]+ MiB \(\d+ slots/stream\), [0-9.]+ bits/value")


def run_tool(name: str, *args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(tool_path(name)), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


def test_llama_completion_uses_the_aquakv_cache(tiny3_aqua):
    aqua = tiny3_aqua[2]
    out = run_tool("llama-completion", "-m", str(aqua), "-p", "Once upon a time", "-n", "8", "--temp", "0",
                   "-t", "2", "-ngl", NGL, "-no-cnv", "-v")
    assert out.returncode == 0, out.stderr[-3000:]
    assert BANNER.search(out.stderr), "no AQUA-KV startup line"


def test_override_kv_turns_the_cache_off(tiny3_aqua):
    aqua = tiny3_aqua[2]
    out = run_tool("llama-completion", "-m", str(aqua), "-p", "Once upon a time", "-n", "8", "--temp", "0",
                   "-t", "2", "-ngl", NGL, "-no-cnv", "-v", "--override-kv", "aquakv.enabled=bool:false")
    assert out.returncode == 0, out.stderr[-3000:]
    assert not BANNER.search(out.stderr)
    assert "cache off (aquakv.enabled / AQUAKV_ENABLED)" in out.stderr


def test_a_conflicting_cache_type_flag_is_a_clear_error(tiny3_aqua):
    aqua = tiny3_aqua[2]
    out = run_tool("llama-completion", "-m", str(aqua), "-p", "x", "-n", "1", "-ctk", "q8_0", "-t", "2",
                   "-ngl", NGL, "-no-cnv")
    assert out.returncode != 0
    assert "AQUA-KV cache cannot be used here" in out.stdout + out.stderr
    assert "--cache-type-k/-v" in out.stdout + out.stderr


def test_llama_cli_single_turn(tiny3_aqua):
    aqua = tiny3_aqua[2]
    out = run_tool("llama-cli", "-m", str(aqua), "-p", "Hello", "-n", "8", "--temp", "0", "-st", "-t", "2",
                   "-ngl", NGL, "-v")
    assert out.returncode == 0, out.stderr[-3000:]
    assert BANNER.search(out.stdout + out.stderr)


@pytest.mark.parametrize("enabled", ["1", "0"])
def test_llama_bench_follows_the_environment_switch(tiny3_aqua, enabled):
    aqua = tiny3_aqua[2]
    out = run_tool("llama-bench", "-m", str(aqua), "-p", "64", "-n", "4", "-r", "1", "-t", "2", "-ngl", NGL,
                   "-o", "json", "-v", env={"AQUAKV_ENABLED": enabled})
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"avg_ts"' in out.stdout
    assert bool(BANNER.search(out.stderr)) == (enabled == "1")


def test_llama_perplexity_kl_divergence(tiny3_aqua, tmp_path):
    _, plain, aqua = tiny3_aqua
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and then some more text {i}" for i in range(400)))
    base = tmp_path / "f16.kld"
    common = ["-f", str(text), "-c", "256", "-b", "32", "-ub", "32", "--chunks", "2", "-t", "2", "-ngl", NGL]
    out = run_tool("llama-perplexity", "-m", str(plain), *common, "--kl-divergence-base", str(base))
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_tool("llama-perplexity", "-m", str(aqua), *common, "--kl-divergence-base", str(base),
                   "--kl-divergence")
    assert out.returncode == 0, out.stderr[-3000:]
    kld = float(re.search(r"Mean\s+KLD:\s*([0-9.eE+-]+)", out.stdout + out.stderr).group(1))
    assert 0 < kld < 0.1
