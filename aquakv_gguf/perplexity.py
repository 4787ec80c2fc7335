"""Perplexity through the bindings: ``python -m aquakv_gguf.perplexity MODEL [FILE]``.

Without FILE the evaluation text (Pride and Prejudice) is used. ``--step 32`` feeds
each window in 32-token steps so attention reads the cache (DESIGN §7).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aquakv_gguf.cli.common import add_context_args, add_model_args, context_kwargs, fail, open_model
from aquakv_gguf.eval.native_perplexity import perplexity
from aquakv_gguf.runtime import LlamaError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aquakv_gguf.perplexity", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="GGUF file, or 'smollm2' for the embedded model")
    ap.add_argument("text", nargs="?", type=Path, help="UTF-8 text file (default: the evaluation text)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--step", type=int, default=None, help="tokens per decode call (default: whole window)")
    add_model_args(ap)
    add_context_args(ap)
    args = ap.parse_args(argv)
    try:
        if args.text is None:
            from aquakv_gguf.assets import evaluation_text
            text = evaluation_text()
        else:
            text = args.text.read_text(encoding="utf-8")
        kwargs = context_kwargs(args)
        kwargs["n_ctx"] = max(kwargs["n_ctx"], args.window)
        with open_model(args) as model, model.context(**kwargs) as ctx:
            tokens = model.tokenize(text, add_special=False)
            res = perplexity(ctx, tokens, window=args.window, n_windows=args.windows, step=args.step)
    except (LlamaError, FileNotFoundError, ValueError) as e:
        return fail(e)
    print(f"perplexity: {res.perplexity:.4f} over {res.n_scored} tokens ({args.windows} windows of "
          f"{args.window}, step {args.step or args.window}, cache {args.cache_type_k}/{args.cache_type_v}); "
          f"{res.tokens_per_second:.0f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
