"""Where the time of one generated token goes, per llama.cpp op (docs/PERF.md).

Fills a context to --depth tokens, then decodes --tokens single tokens with the per-op profiler
on (aquakv_gguf.runtime.profile: every node computed alone and synchronized), and writes the
totals per (op, node name) as TSV plus a summary grouped by op. Run it for the AQUA-KV cache and
for f16 (AQUAKV_ENABLED=0) on the same synthetic model (bench/bench_gpu_cache.py writes them).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("--depth", type=int, default=32768)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--ngl", type=int, default=99)
    ap.add_argument("--out", required=True, help="TSV path; a .json summary is written beside it")
    args = ap.parse_args(argv)
    os.environ["AQUAKV_PROFILE"] = "1"

    import numpy as np

    from aquakv_gguf.runtime import Model, profile

    rng = np.random.default_rng(0)
    with Model(args.model, n_gpu_layers=args.ngl) as model:
        with model.context(n_ctx=args.depth + args.tokens + 64, n_batch=512, n_ubatch=512) as ctx:
            profile.record(False)
            t0 = time.perf_counter()
            ctx.decode(list(map(int, rng.integers(300, model.n_vocab, size=args.depth))), logits="none")
            fill = time.perf_counter() - t0
            profile.record(True)
            t0 = time.perf_counter()
            for tok in rng.integers(300, model.n_vocab, size=args.tokens):
                ctx.decode([int(tok)], logits="last")
            gen = time.perf_counter() - t0
            rows = profile.write(args.out)
            info = ctx.cache_info()
    by_op: dict[str, float] = defaultdict(float)
    for r in rows:
        by_op[r["op"]] += float(r["seconds"])
    total = sum(by_op.values())
    summary = {"model": args.model, "depth": args.depth, "tokens": args.tokens, "aquakv": info is not None,
               "fill_s": round(fill, 2), "profiled_gen_s": round(gen, 3),
               "ms_per_token_by_op": {k: round(v * 1e3 / args.tokens, 3) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
               "ms_per_token_total": round(total * 1e3 / args.tokens, 3),
               "top_nodes": [{**r, "ms_per_token": round(float(r["seconds"]) * 1e3 / args.tokens, 3)} for r in rows[:15]]}
    Path(args.out).with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
