"""The main job on the embedded model: ``python -m aquakv_gguf.demo`` (``make demo``).

Loads SmolLM2-135M-Instruct (embedded GGUF) in the patched llama.cpp, streams a short
greedy generation, then measures perplexity on the evaluation text (Pride and
Prejudice, 20 windows of 512 tokens, f16 cache).
"""

from __future__ import annotations

import argparse
import sys
import time

from aquakv_gguf.assets import evaluation_text, smollm2_gguf
from aquakv_gguf.eval.native_perplexity import perplexity
from aquakv_gguf.runtime import Model, build_info

PROMPT = "The most important thing about a good cup of tea is"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aquakv_gguf.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args(argv)

    print(f"[demo] {build_info()}")
    path = smollm2_gguf()
    print(f"[demo] model: {path}")
    with Model(path) as model, model.context(n_ctx=1024, n_batch=512) as ctx:
        print(f"[demo] {model.description}, {model.n_layer} layers, {model.n_head_kv} KV heads")
        print(f"[demo] generating {args.max_tokens} tokens (greedy):\n")
        t0 = time.perf_counter()
        n = 0
        sys.stdout.write(PROMPT)
        for step in ctx.generate(PROMPT, max_tokens=args.max_tokens):
            sys.stdout.write(step.text)
            sys.stdout.flush()
            n += 1
        dt = time.perf_counter() - t0
        print(f"\n\n[demo] {n} tokens in {dt:.2f}s ({n / dt:.1f} tok/s including the prompt)")

        tokens = model.tokenize(evaluation_text(), add_special=False)
        res = perplexity(ctx, tokens, window=512, n_windows=args.windows)
        print(f"[demo] perplexity on Pride and Prejudice ({args.windows} x 512 tokens, f16 cache): "
              f"{res.perplexity:.3f} ({res.tokens_per_second:.0f} tok/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
