"""Calibration and the reference cache on CUDA agree with the CPU (skipped without a GPU).

The model is built from a config in memory (no tokenizer, no files), so this runs wherever torch
sees a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_model(arch: str):
    import transformers

    cls, cfg = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "qwen3": ("Qwen3ForCausalLM", "Qwen3Config")}[arch]
    config = getattr(transformers, cfg)(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                        max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    return getattr(transformers, cls)(config).float().eval()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cuda_matches_cpu(arch: str) -> None:
    from aquakv_gguf.calibrate import calibrate, recipe_for_hf_config
    from aquakv_gguf.eval.reference_eval import stepwise_logits
    from aquakv_gguf.reference import AquaKVCache

    model = tiny_model(arch)
    recipe = recipe_for_hf_config(model.config)
    ids = torch.randint(0, 512, (12, 128), generator=torch.Generator().manual_seed(1))
    heldout = torch.zeros(12, dtype=torch.bool)
    heldout[:2] = True
    cpu = calibrate(model, recipe, ids, heldout, bits=(2,), progress=False)
    gpu_model = tiny_model(arch).cuda()
    gpu = calibrate(gpu_model, recipe, ids, heldout, bits=(2,), device="cuda", progress=False)
    # Float order differs between devices, which can move a quantization code and with it the
    # (small-sample, hence sensitive) fit slightly: compare whole matrices, not elements.
    for a, b in zip(cpu.params[2].predictors[1:], gpu.params[2].predictors[1:]):
        for name, arr in a.arrays().items():
            diff = np.linalg.norm(getattr(b, name) - arr) / max(np.linalg.norm(arr), 1e-6)
            assert diff < 0.05, (name, diff)
    for ra, rb in zip(cpu.reports[2], gpu.reports[2]):
        assert rb.k == pytest.approx(ra.k, rel=0.05) and rb.v == pytest.approx(ra.v, rel=0.05)

    x = ids[:1, :200] if ids.shape[1] >= 200 else torch.randint(0, 512, (1, 200))
    with torch.no_grad():
        plain = gpu_model(input_ids=x.cuda()).logits
    off = stepwise_logits(gpu_model, x.cuda(), AquaKVCache(gpu_model, mode="off"), step=32)
    torch.testing.assert_close(off, plain, rtol=1e-3, atol=1e-3)
    aqua_gpu = stepwise_logits(gpu_model, x.cuda(), AquaKVCache(gpu_model, mode="aqua", params=cpu.params[2]), step=32)
    aqua_cpu = stepwise_logits(model, x, AquaKVCache(model, mode="aqua", params=cpu.params[2]), step=32)
    torch.testing.assert_close(aqua_gpu.cpu(), aqua_cpu, rtol=2e-2, atol=2e-2)
