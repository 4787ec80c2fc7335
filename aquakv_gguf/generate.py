"""Generate text with the patched llama.cpp: ``python -m aquakv_gguf.generate MODEL "prompt"``.

MODEL is a GGUF file, or ``smollm2`` for the embedded SmolLM2-135M-Instruct. Tokens are
streamed to stdout as they come; prompt and generation speed go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

from aquakv_gguf.cli.common import add_model_args, add_context_args, open_model, context_kwargs, fail
from aquakv_gguf.runtime import LlamaError, SamplingParams


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aquakv_gguf.generate", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="GGUF file, or 'smollm2' for the embedded model")
    ap.add_argument("prompt")
    ap.add_argument("-n", "--max-tokens", type=int, default=128)
    ap.add_argument("--temp", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=40)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=None)
    add_model_args(ap)
    add_context_args(ap)
    args = ap.parse_args(argv)
    try:
        with open_model(args) as model, model.context(**context_kwargs(args)) as ctx:
            prompt_tokens = model.tokenize(args.prompt)
            sampling = SamplingParams(args.temp, args.top_k, args.top_p, args.seed)
            t0 = time.perf_counter()
            t_first = None
            n = 0
            sys.stdout.write(args.prompt)
            for step in ctx.generate(prompt_tokens, max_tokens=args.max_tokens, sampling=sampling):
                if t_first is None:
                    t_first = time.perf_counter()
                n += 1
                sys.stdout.write(step.text)
                sys.stdout.flush()
            t1 = time.perf_counter()
            sys.stdout.write("\n")
            t_first = t_first or t1
            gen_rate = (n - 1) / (t1 - t_first) if n > 1 and t1 > t_first else float("nan")
            print(f"[aquakv] prompt: {len(prompt_tokens)} tokens in {t_first - t0:.2f}s "
                  f"({len(prompt_tokens) / max(t_first - t0, 1e-9):.1f} tok/s incl. first token); "
                  f"generated {n} tokens ({gen_rate:.1f} tok/s)", file=sys.stderr)
    except (LlamaError, FileNotFoundError, ValueError) as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
