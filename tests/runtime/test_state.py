"""State save/restore and sequence operations through the bindings."""

from __future__ import annotations

import numpy as np
import pytest

from aquakv_gguf.runtime import LlamaError

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


def test_state_roundtrip_reproduces_next_token_logits_exactly(smollm2_model):
    tokens = smollm2_model.tokenize(PROMPT)
    with smollm2_model.context(n_ctx=256) as ctx:
        ctx.decode(tokens[:-1], logits="none")
        state = ctx.save_state()
        expected = ctx.decode(tokens[-1:])
    with smollm2_model.context(n_ctx=256) as fresh:
        fresh.load_state(state)
        assert fresh.seq_pos_max(0) == len(tokens) - 2
        got = fresh.decode(tokens[-1:])
    np.testing.assert_array_equal(got, expected)


def test_seq_state_roundtrip_into_other_sequence(smollm2_model):
    tokens = smollm2_model.tokenize(PROMPT)
    with smollm2_model.context(n_ctx=256, n_seq_max=2) as ctx:
        ctx.decode(tokens[:-1], logits="none")
        expected = ctx.decode(tokens[-1:])
        ctx.seq_rm(0, len(tokens) - 1, -1)
        data = ctx.save_seq_state(0)
        ctx.clear()
        ctx.load_seq_state(data, 1)
        got = ctx.decode(tokens[-1:], seq_id=1)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_seq_rm_then_redecode_matches(smollm2_model):
    """Removing a suffix and decoding other tokens there equals never having decoded the suffix."""
    tokens = smollm2_model.tokenize(PROMPT)
    head, tail = tokens[:-4], tokens[-4:]
    detour = smollm2_model.tokenize(" and then something else entirely", add_special=False)[:6]
    with smollm2_model.context(n_ctx=256) as ref_ctx:
        ref_ctx.decode(head, logits="none")
        expected = ref_ctx.decode(tail)
    with smollm2_model.context(n_ctx=256) as ctx:
        ctx.decode(head, logits="none")
        ctx.decode(detour, logits="none")
        assert ctx.seq_rm(0, len(head), -1)
        assert ctx.seq_pos_max(0) == len(head) - 1
        got = ctx.decode(tail)
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_corrupt_state_is_rejected(smollm2_model):
    with smollm2_model.context(n_ctx=256) as ctx:
        ctx.decode(smollm2_model.tokenize(PROMPT), logits="none")
        state = ctx.save_state()
    with smollm2_model.context(n_ctx=256) as fresh:
        with pytest.raises(LlamaError):
            fresh.load_state(state[: len(state) // 3])
