"""DESIGN §7 protocol on the torch reference: scoring, KLD and top-1 vs the f16 cache."""

from __future__ import annotations

import math

import pytest
import torch

from aquakv_gguf.eval.reference_eval import ModeSpec, eval_windows, evaluate_reference, format_table


def test_protocol_scores_every_position_but_the_last(tiny_hf_factory) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_factory("llama", n_layers=2)), dtype=torch.float32).eval()
    tokens = torch.randint(0, 2000, (700,), generator=torch.Generator().manual_seed(0)).tolist()
    wins = eval_windows(tokens, 160, 2)
    assert wins[1][0] == tokens[160] and eval_windows(tokens, 160, 2, bos_id=1)[1][:2] == [1, tokens[159]]
    with pytest.raises(ValueError, match="need"):
        eval_windows(tokens, 400, 2)
    res = evaluate_reference(model, wins, [ModeSpec("off", "off"), ModeSpec("HIGGS 2-bit", "higgs", bits=2)],
                             step=32, progress=False)
    assert list(res) == ["f16", "off", "HIGGS 2-bit"]
    f16, off, higgs = res["f16"], res["off"], res["HIGGS 2-bit"]
    assert f16.n_scored == 2 * 159 and f16.kld == 0 and f16.top1 == 1
    # "off" is the plain model: its perplexity is the one-pass perplexity of the windows.
    nll = 0.0
    with torch.no_grad():
        for w in wins:
            ids = torch.tensor([w])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            nll += float(-logp.gather(1, ids[0, 1:, None]).sum())
    assert off.perplexity == pytest.approx(math.exp(nll / (2 * 159)), rel=1e-5)
    assert 0 < off.kld < 1e-3 and higgs.kld > off.kld and higgs.top1 <= 1
    assert f16.bits_per_value[8192] == 16 and 2 < higgs.bits_per_value[32768] < 3
    table = format_table(res)
    assert "| HIGGS 2-bit |" in table and "mean KLD" in table
