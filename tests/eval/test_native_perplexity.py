"""SmolLM2 perplexity through the bindings agrees with transformers on the same windows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aquakv_gguf.eval.native_perplexity import perplexity, windows
from aquakv_gguf.runtime import Model

from aquakv_gguf.testing.gpu import test_n_gpu_layers

NGL = test_n_gpu_layers()

WINDOW, N_WINDOWS = 512, 20


@pytest.fixture(scope="module")
def eval_tokens(smollm2_path):
    from aquakv_gguf.assets import evaluation_text
    with Model(smollm2_path, vocab_only=True) as vocab:
        return vocab.tokenize(evaluation_text(), add_special=False)


def transformers_perplexity(path, wins: list[list[int]]) -> float:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    model.eval()
    nlls = []
    with torch.no_grad():
        for win in wins:
            ids = torch.tensor([win])
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            nlls.append(-logp[torch.arange(len(win) - 1), ids[0, 1:]].mean().item())
    return math.exp(float(np.mean(nlls)))


def test_perplexity_matches_transformers(smollm2_path, eval_tokens):
    with Model(smollm2_path, n_gpu_layers=NGL) as model, model.context(n_ctx=WINDOW, n_batch=WINDOW) as ctx:
        ours = perplexity(ctx, eval_tokens, window=WINDOW, n_windows=N_WINDOWS, progress=False)
    theirs = transformers_perplexity(smollm2_path, windows(eval_tokens, WINDOW, N_WINDOWS))
    rel = ours.perplexity / theirs - 1
    print(f"llama.cpp {ours.perplexity:.3f} vs transformers {theirs:.3f} ({100 * rel:+.2f}%)")
    assert 5 < theirs < 100  # a sane language model on English prose
    assert abs(rel) < 0.02


# Stepped vs one-pass perplexity, |ratio - 1|. Measured on an AVX-512 Zen 4 CPU (SmolLM2,
# 2 x 256-token windows): without flash attention 0.000% (the f16 cache is read back in both
# feedings, the KQ/KQV products only change summation order); with flash attention and
# 64-token steps 0.000% (the same tiled f32 kernel runs as for one pass); with flash
# attention and 32-token steps 0.359%, because the CPU kernel switches below 64 query rows
# to the one-chunk kernel that converts Q to f16 and accumulates V·softmax in f16. On CUDA
# the mat-vec kernels also change with the batch size (quantized activations for small
# batches): 0.4% on an H200.
STEPPED_BOUND = {  # (flash_attn, step) -> bound
    ("off", 32): 2e-3 if NGL == 0 else 6e-3,
    ("on", 64): 2e-3 if NGL == 0 else 6e-3,
    ("on", 32): 6e-3,
}


@pytest.mark.parametrize("flash_attn,step", sorted(STEPPED_BOUND))
def test_stepped_feeding_matches_one_pass(smollm2_path, eval_tokens, flash_attn, step):
    """Short steps read the cache; the result equals one pass up to the rounding above."""
    with Model(smollm2_path, n_gpu_layers=NGL) as model, \
            model.context(n_ctx=WINDOW, n_batch=WINDOW, flash_attn=flash_attn) as ctx:
        one = perplexity(ctx, eval_tokens, window=256, n_windows=2, progress=False)
        stepped = perplexity(ctx, eval_tokens, window=256, n_windows=2, step=step, progress=False)
    rel = abs(stepped.perplexity / one.perplexity - 1)
    print(f"flash_attn={flash_attn} step={step}: {100 * rel:.3f}%")
    assert rel < STEPPED_BOUND[(flash_attn, step)]


def test_windows_too_short():
    with pytest.raises(ValueError, match="need 1024 tokens"):
        windows(list(range(1000)), 512, 2)
