"""llama.cpp and transformers tokenize Austen text into identical ids with SmolLM2's vocabulary."""

from __future__ import annotations

N_CHARS = 6000


def test_tokenization_matches_transformers(smollm2_model, smollm2_path):
    from transformers import AutoTokenizer

    from aquakv_gguf.assets import calibration_text, evaluation_text
    tok = AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    for text in (evaluation_text()[:N_CHARS], calibration_text()[50_000:50_000 + N_CHARS]):
        ours = smollm2_model.tokenize(text, add_special=False)
        theirs = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ours) > 1000
        first_diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        assert ours == theirs, f"first difference at token {first_diff}"
        assert smollm2_model.detokenize(ours) == text


def test_tokenize_special_and_empty(smollm2_model):
    assert smollm2_model.tokenize("", add_special=False) == []
    ids = smollm2_model.tokenize("<|im_start|>user", add_special=False, parse_special=True)
    assert ids[0] == smollm2_model.tokenize("<|im_start|>", add_special=False, parse_special=True)[0]
    assert len(smollm2_model.tokenize("<|im_start|>", add_special=False, parse_special=False)) > 1
