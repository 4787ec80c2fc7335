"""The generate and perplexity command lines."""

from __future__ import annotations

import subprocess
import sys

from aquakv_gguf.testing.gpu import test_n_gpu_layers

NGL = test_n_gpu_layers()


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def test_generate_streams_and_reports_speed(tiny_llama_gguf):
    res = run("aquakv_gguf.generate", str(tiny_llama_gguf), "Hello there", "-n", "8", "-c", "256", "-ngl", str(NGL))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("Hello there")
    assert "generated 8 tokens" in res.stderr and "tok/s" in res.stderr


def test_generate_bad_inputs(tiny_llama_gguf, tmp_path):
    res = run("aquakv_gguf.generate", str(tmp_path / "none.gguf"), "hi")
    assert res.returncode == 2 and "model file not found" in res.stderr
    res = run("aquakv_gguf.generate", str(tiny_llama_gguf), "hi", "--override-kv", "broken")
    assert res.returncode == 2 and "key=type:value" in res.stderr
    res = run("aquakv_gguf.generate", str(tiny_llama_gguf), "hi", "-ctk", "nope")
    assert res.returncode == 2 and "unknown cache type" in res.stderr


def test_perplexity_cli(tiny_llama_gguf, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    res = run("aquakv_gguf.perplexity", str(tiny_llama_gguf), str(text), "--window", "128", "--windows", "2",
              "--step", "32", "-c", "256", "-ngl", str(NGL))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "perplexity:" in res.stdout
    value = float(res.stdout.split("perplexity:")[1].split()[0])
    assert 1.0 < value < 1e6
