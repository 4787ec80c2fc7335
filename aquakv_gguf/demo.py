"""The main job on the embedded model: ``python -m aquakv_gguf.demo`` (``make demo``).

1. Loads SmolLM2-135M-Instruct (embedded GGUF) in the patched llama.cpp, streams a short
   greedy generation and measures perplexity on the evaluation text (Pride and
   Prejudice, 20 windows of 512 tokens, f16 cache).
2. Converts it to ``smollm2.aqua.gguf``: calibrates the AQUA-KV predictors on the
   calibration books and writes them with the codebooks into the GGUF.
3. Loads the converted file in llama.cpp, which now keeps its KV cache as AQUA-KV (2-bit
   residual codes, f16 sinks and recent window), reports the cache's size, generates with it
   and compares perplexity with the f16 cache on the same windows, fed in 32-token steps so
   that nearly every attended token comes from the compressed cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from aquakv_gguf.assets import cache_dir, evaluation_text, smollm2_gguf
from aquakv_gguf.convert import convert, format_summary
from aquakv_gguf.eval.native_perplexity import perplexity
from aquakv_gguf.runtime import Model, build_info

PROMPT = "The most important thing about a good cup of tea is"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aquakv_gguf.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--bits", type=int, choices=(2, 3, 4), default=2)
    ap.add_argument("--out", type=Path, default=None, help="converted model (default: in the cache folder)")
    ap.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens (default: the recipe's)")
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

    out = args.out or cache_dir() / "demo" / f"smollm2.aqua{args.bits}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n[demo] converting to {out} (AQUA-KV {args.bits}-bit) ...", flush=True)
    summary = convert(path, out, bits=args.bits, calib_tokens=args.calib_tokens, force=True)
    print(format_summary(summary))

    with Model(out) as model, model.context(n_ctx=1024) as ctx:
        info = ctx.cache_info()
        if info is None:
            print("[demo] error: llama.cpp did not create the AQUA-KV cache for the converted model")
            return 1
        f16_bytes = 2 * model.n_layer * model.n_head_kv * (model.n_embd // model.n_head) * info["cells"] * 2
        kv_bytes = info["codes_bytes"] + info["window_bytes"]
        print(f"[demo] llama.cpp runs {out.name} with the AQUA-KV cache: {kv_bytes / 2**20:.2f} MiB for "
              f"{info['cells']} cells (f16 cache: {f16_bytes / 2**20:.2f} MiB); generating:\n")
        sys.stdout.write(PROMPT)
        for step in ctx.generate(PROMPT, max_tokens=args.max_tokens):
            sys.stdout.write(step.text)
            sys.stdout.flush()
        print()
        tokens = model.tokenize(evaluation_text(), add_special=False)
        n_win = max(1, args.windows // 5)
        aq = perplexity(ctx, tokens, window=1024, n_windows=n_win, step=32)
    with Model(out, aquakv=False) as model, model.context(n_ctx=1024) as ctx:
        f16 = perplexity(ctx, tokens, window=1024, n_windows=n_win, step=32)
    print(f"[demo] perplexity, {n_win} x 1024 tokens fed in 32-token steps: AQUA-KV {args.bits}-bit "
          f"{aq.perplexity:.3f} vs f16 cache {f16.perplexity:.3f} ({100 * (aq.perplexity / f16.perplexity - 1):+.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
