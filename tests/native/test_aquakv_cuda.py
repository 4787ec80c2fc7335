"""AQUA-KV on CUDA: the CUDA kernels against the CPU ones, the whole model on the GPU against the CPU
run, and no AQUA-KV op left on the host when every layer is offloaded. Needs a CUDA build and a GPU
(the device machine); the nvcc compile check runs wherever nvcc is installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from aquakv_gguf.eval.native_perplexity import log_softmax, window_logits
from aquakv_gguf.paths import tool_path
from aquakv_gguf.quant import bits_per_code, gaussian_grid
from aquakv_gguf.runtime import Model, supports_gpu_offload
from aquakv_gguf.runtime.ops import cast_f16, decode_rows, encode_rows, rope_f16, split_rows

ROOT = Path(__file__).resolve().parents[2]
needs_cuda = pytest.mark.skipif(not supports_gpu_offload(), reason="needs a CUDA build and a GPU")
GRIDS = {n: gaussian_grid(n) for n in (16, 64, 256)}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_90", "sm_75"])
def test_cuda_kernels_compile(tmp_path, arch):
    """Our kernels build for Hopper and for consumer cards (no Hopper-only instruction)."""
    src = ROOT / "native" / "ops-cuda" / "aquakv-kernels.cu"
    out = subprocess.run(["nvcc", "-std=c++17", f"-arch={arch}", "-c", str(src), "-o", str(tmp_path / "k.o"),
                          "-I", str(src.parent)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]


def sample(n_rows: int, n_channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(-3, 3, size=(n_rows, 1)))
    return (rng.standard_normal((n_rows, n_channels)) * scale).astype(np.float32)


@needs_cuda
@pytest.mark.parametrize("neox", [False, True])
def test_cuda_rope_and_cast_match_the_cpu(neox):
    """The fused RoPE + f16 op and the value cast on CUDA against upstream's ggml_rope_ext + cast on
    the same backend. (Against the CPU the angles themselves differ: at positions up to 32768,
    ggml-cuda's and ggml-cpu's sin/cos of the same f32 angle disagree in the last bits, for
    upstream's own RoPE as much as for ours, so the CPU is no oracle for the GPU here; measured on
    an H200, 2026-12-02.) CUDA may contract a product and a sum into an FMA where ggml's kernel does
    not, so a few f16 values may differ by one ulp."""
    rng = np.random.default_rng(int(neox))
    x = rng.standard_normal((4097, 8, 128)).astype(np.float32)
    pos = rng.integers(0, 32768, 4097).astype(np.int32)
    upstream = rope_f16(x, pos, neox=neox, freq_base=500000.0, gpu=True, fused=False).astype(np.float32)
    gpu = rope_f16(x, pos, neox=neox, freq_base=500000.0, gpu=True).astype(np.float32)
    close = np.isclose(gpu, upstream, rtol=2e-3, atol=1e-6)
    print(f"fused vs upstream RoPE on CUDA: {np.mean(gpu == upstream):.5f} identical, {np.mean(close):.5f} close")
    assert close.all() and np.mean(gpu == upstream) >= 0.999
    v = x.reshape(-1, 1024)
    np.testing.assert_array_equal(cast_f16(v, gpu=True).view(np.uint16), v.astype(np.float16).view(np.uint16))


@needs_cuda
@pytest.mark.parametrize("n_points", [16, 64, 256])
@pytest.mark.parametrize("n_channels,group_size", [(192, 64), (128, 128), (1024, 1024), (512, 128)])
def test_cuda_codes_and_decode_match_the_cpu(n_points, n_channels, group_size):
    grid, bits = GRIDS[n_points], bits_per_code(n_points)
    x = sample(2048, n_channels, seed=n_points * n_channels)
    cpu = encode_rows(x, grid, group_size)
    gpu = encode_rows(x, grid, group_size, gpu=True)
    c_cpu, s_cpu = split_rows(cpu, n_channels, group_size, bits)
    c_gpu, s_gpu = split_rows(gpu, n_channels, group_size, bits)
    assert np.mean(c_cpu == c_gpu) >= 0.999
    assert np.mean(s_cpu == s_gpu) >= 0.999
    d_cpu = decode_rows(cpu, grid, n_channels, group_size)
    d_gpu = decode_rows(cpu, grid, n_channels, group_size, gpu=True)
    rel = np.abs(d_gpu - d_cpu).max(axis=1) / np.abs(d_cpu).max(axis=1)
    assert rel.max() <= 1e-3


@needs_cuda
def test_cuda_model_matches_the_cpu_run(tiny3_aqua):
    """CUDA AQUA-KV vs CPU AQUA-KV logits: mean KLD <= 1e-3, top-1 agreement >= 99% where the CPU has
    a clear winner. The random tiny model's next-token distributions are nearly flat (median top-2
    margin ~0.05 nats over 32k tokens), so its top-1 among near-ties follows float noise of any
    backend: the f16 cache's own CPU-vs-CUDA agreement is measured alongside as the baseline."""
    aqua = tiny3_aqua[2]
    rng = np.random.default_rng(5)
    windows = [list(map(int, rng.integers(100, 20000, size=512))) for _ in range(2)]

    def logits(ngl, aquakv=True):
        # the CPU run must not offload its large-batch ops to the GPU (op_offload), or it is
        # partly a CUDA run itself
        with Model(aqua, n_gpu_layers=ngl, aquakv=aquakv) as model, \
                model.context(n_ctx=512, op_offload=ngl > 0) as ctx:
            return log_softmax(np.concatenate([window_logits(ctx, w, 32) for w in windows]))

    def compare(cpu, gpu):
        agree = cpu.argmax(-1) == gpu.argmax(-1)
        top2 = np.sort(cpu, axis=-1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 0.1
        kld = float((np.exp(cpu) * (cpu - gpu)).sum(-1).mean())
        return float(agree.mean()), float(agree[clear].mean()), int(clear.sum()), kld

    top1, top1_clear, n_clear, kld = compare(logits(0), logits(99))
    b_top1, b_top1_clear, _, b_kld = compare(logits(0, aquakv=False), logits(99, aquakv=False))
    print(f"CUDA vs CPU AQUA-KV: top-1 {top1:.4f}, where the CPU's margin > 0.1 nats {top1_clear:.4f} of {n_clear}, "
          f"mean KLD {kld:.2e} | f16 cache CUDA vs CPU: top-1 {b_top1:.4f}, clear {b_top1_clear:.4f}, KLD {b_kld:.2e}")
    assert n_clear >= 100
    assert top1_clear >= 0.99
    assert kld <= 1e-3


@needs_cuda
def test_no_aquakv_op_runs_on_the_host_when_offloaded(tiny3_aqua):
    aqua = tiny3_aqua[2]
    out = subprocess.run([str(tool_path("llama-completion")), "-m", str(aqua), "-p", "Once upon a time " * 40,
                          "-n", "4", "--temp", "0", "-ngl", "99", "-no-cnv", "-v"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "GGML_SCHED_DEBUG": "2"}, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    nodes = re.findall(r"node #\s*\d+ \((AQUAKV_\w*)\): .*?\[\s*(\S+)", out.stderr)
    assert nodes, "the scheduler log shows no AQUA-KV op"
    on_host = [n for n in nodes if not n[1].startswith("CUDA")]
    assert not on_host, f"AQUA-KV ops scheduled off the GPU: {on_host[:5]}"
