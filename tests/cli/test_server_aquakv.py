"""llama-server with the AQUA-KV cache: parallel slots, context shift, slot save/restore.

Greedy output for one prompt must agree across slots and runs; where upstream's own f16 cache
already diverges under the same batching (unified cache + flash attention sum in another order),
AQUA-KV may diverge too, but no earlier than the f16 cache does. Both are measured.
"""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest
from test_server import http, server  # same folder (pytest puts it on sys.path)

PROMPT_WORDS = ("It is a truth universally acknowledged that a single man in possession of a good fortune "
                "must be in want of a wife . ").split()


def prompt(n_words: int, shift: int = 0) -> str:
    return " ".join(PROMPT_WORDS[(i + shift) % len(PROMPT_WORDS)] for i in range(n_words))


def completion(base: str, text: str, n_predict: int, **kw) -> dict:
    status, body = http(base + "/completion", {"prompt": text, "n_predict": n_predict, "temperature": 0,
                                               "cache_prompt": False, "return_tokens": True, **kw}, timeout=600)
    assert status == 200, body
    return body


def concurrent_tokens(base: str, text: str, n: int = 8, n_predict: int = 32) -> list[list[int]]:
    with cf.ThreadPoolExecutor(n) as pool:
        bodies = list(pool.map(lambda _: completion(base, text, n_predict), range(n)))
    for b in bodies:
        assert b["tokens_predicted"] == n_predict
    return [b["tokens"] for b in bodies]


def first_divergence(runs: list[list[int]]) -> int:
    """Index of the first generated token where the runs disagree (len if they never do)."""
    arr = np.array(runs)
    differs = (arr != arr[0]).any(axis=0)
    return int(np.argmax(differs)) if differs.any() else arr.shape[1]


@pytest.mark.parametrize("unified", [False, True])
def test_eight_requests_on_four_slots_agree(tiny3_aqua, tmp_path, unified):
    _, plain, aqua = tiny3_aqua
    text = prompt(170)  # the prompt alone fills a 128-token chunk: generation reads quantized cells
    flags = ["-c", "2048", "-np", "4", "-kvu" if unified else "-no-kvu"]
    result = {}
    for name, model in (("f16", plain), ("aquakv", aqua)):
        with server(model, tmp_path, *flags) as (base, _):
            runs = concurrent_tokens(base, text) + concurrent_tokens(base, text)  # two rounds: across runs
        result[name] = first_divergence(runs)
    print(f"unified={unified}: first divergent token f16 {result['f16']}, AQUA-KV {result['aquakv']} (of 32)")
    if result["f16"] == 32:
        assert result["aquakv"] == 32
    else:
        assert result["aquakv"] >= result["f16"]


def test_context_shift_and_slot_save_restore(tiny3_aqua, tmp_path):
    _, _, aqua = tiny3_aqua
    slots = tmp_path / "slots"
    slots.mkdir()
    with server(aqua, tmp_path, "-c", "256", "-np", "1", "--context-shift", "--slot-save-path", str(slots)) as (base, _):
        # 100 prompt tokens + 300 generated in 256 cells: the server shifts the context (a position update)
        body = completion(base, prompt(100), 300, ignore_eos=True)
        assert body["tokens_predicted"] == 300

        first = completion(base, prompt(150, shift=3), 16, cache_prompt=True, id_slot=0)
        status, saved = http(base + "/slots/0?action=save", {"filename": "slot0.bin"})
        assert status == 200 and saved["n_saved"] > 0
        assert http(base + "/slots/0?action=erase", {})[0] == 200
        status, restored = http(base + "/slots/0?action=restore", {"filename": "slot0.bin"})
        assert status == 200 and restored["n_restored"] == saved["n_saved"]
        again = completion(base, prompt(150, shift=3), 16, cache_prompt=True, id_slot=0)
        assert again["tokens"] == first["tokens"]
        assert again["timings"]["prompt_n"] < 10, "the restored slot's cache was not reused"
