"""Issue 4 benchmark: SmolLM2 with the f16, q8_0, q4_0 and AQUA-KV 2-/3-bit caches on this CPU.

1. llama-perplexity, -c 2048 -b 32 -ub 32, 12 chunks of Pride and Prejudice: perplexity, mean KLD
   and top-1 agreement against the f16 cache (its logits saved with --kl-divergence-base).
2. KV MiB at 8192 context: upstream types from their block sizes (what llama.cpp allocates), AQUA-KV
   from the cache itself (codes + scales + f16 window; scratch excluded, as the cache reports it).
3. llama-bench: prompt processing (512 tokens) and generation (32 tokens) at depth 0 and 2048.

Writes the table to docs/RESULTS.md (section "cpu-cache") and raw outputs to bench/results/<date>-cpu/.

    python bench/bench_cpu_cache.py --aqua "AQUA-KV 2-bit dense=bench/work/smollm2.dense.aqua2.gguf" \\
        --aqua "AQUA-KV 2-bit lowrank:32=bench/work/smollm2.lr32.aqua2.gguf"

Every ``--aqua LABEL=PATH`` is one AQUA-KV row (any bit width or predictor form of SmolLM2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results_md import write_section  # noqa: E402

from aquakv_gguf.assets import smollm2_gguf  # noqa: E402
from aquakv_gguf.assets.austen import evaluation_text  # noqa: E402
from aquakv_gguf.paths import tool_path  # noqa: E402

log = logging.getLogger("bench_cpu_cache")

# (name, model key, extra llama.cpp args) of the upstream caches; "plain" is the model without AQUA-KV.
# The AQUA-KV rows come from --aqua LABEL=PATH (model key = LABEL, no extra args).
UPSTREAM = [
    ("f16", "plain", []),
    ("q8_0", "plain", ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"]),
    ("q4_0", "plain", ["-ctk", "q4_0", "-ctv", "q4_0", "-fa", "on"]),
]
BLOCK_BYTES = {"f16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32)}  # bytes per block, values per block


def run(cmd: list[str], out: Path, env: dict[str, str] | None = None) -> str:
    log.info("running %s", " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)
    out.write_text(f"$ {' '.join(cmd)}\n\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}); see {out}\n{proc.stderr[-3000:]}")
    log.info("done in %.0f s", time.perf_counter() - t0)
    return proc.stdout + proc.stderr


def grab(pattern: str, text: str, what: str) -> float:
    m = re.search(pattern, text)
    if not m:
        raise RuntimeError(f"could not find {what} in the llama-perplexity output")
    return float(m.group(1))


def file_tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def perplexity_runs(configs, models: dict[str, Path], text_file: Path, out_dir: Path, args) -> dict[str, dict]:
    base = text_file.parent / "f16.kld-base"  # ~1 GB of logits: kept out of bench/results
    common = ["-f", str(text_file), "-c", "2048", "-b", "32", "-ub", "32", "--chunks", str(args.chunks),
              "-t", str(args.threads)]
    res = {}
    for name, key, extra in configs:
        cmd = [str(tool_path("llama-perplexity")), "-m", str(models[key]), *common, *extra,
               "--kl-divergence-base", str(base)]
        if name != "f16":
            cmd.append("--kl-divergence")
        t0 = time.perf_counter()
        text = run(cmd, out_dir / f"perplexity-{file_tag(name)}.txt")
        row = {"seconds": time.perf_counter() - t0}
        if name == "f16":
            row["ppl"] = grab(r"Final estimate: PPL = ([0-9.]+)", text, "the final perplexity")
            row.update(kld=0.0, top1=100.0)
        else:
            row["ppl"] = grab(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", text, "Mean PPL(Q)")
            row["kld"] = grab(r"Mean\s+KLD:\s*([0-9.eE+-]+)", text, "Mean KLD")
            row["top1"] = grab(r"Same top p:\s*([0-9.]+)", text, "Same top p")
        res[name] = row
        log.info("%s: %s", name, row)
    return res


def kv_mib_8k(configs, models: dict[str, Path]) -> dict[str, float]:
    from aquakv_gguf.runtime import Model

    out = {}
    with Model(models["plain"], aquakv=False) as m:
        n_layer, c = m.n_layer, m.n_head_kv * (m.n_embd // m.n_head)
    for name, key, extra in configs:
        if key == "plain":
            t = extra[1] if extra else "f16"
            per_block, per_values = BLOCK_BYTES[t]
            out[name] = 2 * n_layer * 8192 * c * per_block / per_values / 2**20
            continue
        with Model(models[key]) as m, m.context(n_ctx=8192, n_batch=512) as ctx:
            info = ctx.cache_info()
        out[name] = (info["codes_bytes"] + info["window_bytes"]) / 2**20
    return out


def bench_runs(configs, models: dict[str, Path], out_dir: Path, args) -> dict[str, dict]:
    res = {}
    for name, key, extra in configs:
        cmd = [str(tool_path("llama-bench")), "-m", str(models[key]), "-p", "512", "-n", str(args.gen_tokens),
               "-d", "0,2048", "-t", str(args.threads), "-r", str(args.reps), "-o", "json"]
        # llama-bench has its own flag parser: -ctk/-ctv, and -fa 1
        for flag, value in zip(extra[::2], extra[1::2]):
            cmd += [flag, "1" if value == "on" else value]
        text = run(cmd, out_dir / f"bench-{file_tag(name)}.txt")
        rows = json.loads(text[text.index("["):text.rindex("]") + 1])
        speeds = {}
        for r in rows:
            kind = "pp" if r["n_prompt"] > 0 else "tg"
            speeds[f"{kind}@{r['n_depth']}"] = r["avg_ts"]
        res[name] = speeds
        log.info("%s: %s", name, speeds)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aqua", action="append", required=True, metavar="LABEL=PATH",
                    help="an AQUA-KV conversion of SmolLM2 and its row label (repeatable); the first one "
                         "labelled '... 2-bit ...' is the acceptance row")
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--reuse-perplexity", action="store_true",
                    help="take the llama-perplexity results from this date's summary.json (rerun speed only)")
    ap.add_argument("--no-write", action="store_true", help="do not touch docs/RESULTS.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    out_dir = ROOT / "bench" / "results" / f"{dt.date.today().isoformat()}-cpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    models: dict[str, Path] = {"plain": smollm2_gguf()}
    configs = list(UPSTREAM)
    for spec in args.aqua:
        label, sep, path = spec.partition("=")
        if not sep or not label or not Path(path).is_file():
            ap.error(f"--aqua wants LABEL=PATH of an existing file, got {spec!r}")
        models[label] = Path(path)
        configs.append((label, label, []))
    text_file = out_dir.parent.parent / "work" / "pride-and-prejudice.txt"
    text_file.parent.mkdir(parents=True, exist_ok=True)
    text_file.write_text(evaluation_text())

    t0 = time.perf_counter()
    summary_path = out_dir / "summary.json"
    if args.reuse_perplexity:
        ppl = json.loads(summary_path.read_text())["perplexity"]
        log.info("reusing the perplexity results of %s", summary_path)
    else:
        ppl = perplexity_runs(configs, models, text_file, out_dir, args)
    kv = kv_mib_8k(configs, models)
    speed = {} if args.skip_speed else bench_runs(configs, models, out_dir, args)
    summary_path.write_text(json.dumps({"perplexity": ppl, "kv_mib_8k": kv, "speed": speed}, indent=2))

    f16 = ppl["f16"]["ppl"]
    lines = ["| cache | bits/value | KV MiB @8K | PPL | Δ PPL | mean KLD | top-1 | pp512 t/s d0 | pp512 t/s d2048 "
             f"| tg{args.gen_tokens} t/s d0 | tg{args.gen_tokens} t/s d2048 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    f16_kv = kv["f16"]
    for name, _, _ in configs:
        p, s = ppl[name], speed.get(name, {})
        bits = 16 * kv[name] / f16_kv

        def sp(k, s=s):
            return f"{s[k]:.1f}" if k in s else "-"
        lines.append(f"| {name} | {bits:.2f} | {kv[name]:.1f} | {p['ppl']:.4f} | {100 * (p['ppl'] / f16 - 1):+.2f}% "
                     f"| {p['kld']:.5f} | {p['top1']:.2f}% | {sp('pp@0')} | {sp('pp@2048')} "
                     f"| {sp('tg@0')} | {sp('tg@2048')} |")
    q4, f16_speed = ppl["q4_0"]["kld"], speed.get("f16", {})
    checks = []
    for name, key, _ in configs:
        if key == "plain":
            continue
        s = speed.get(name, {})
        ratio = (f"tg32@2048 {s['tg@2048'] / f16_speed['tg@2048']:.2f}× f16, pp512@2048 "
                 f"{s['pp@2048'] / f16_speed['pp@2048']:.2f}× f16" if s and f16_speed else "speed not run")
        checks.append(f"- {name}: mean KLD {ppl[name]['kld'] / q4:.2f}× q4_0's, PPL "
                      f"{100 * (ppl[name]['ppl'] / f16 - 1):+.2f}%, {16 * kv[name] / f16_kv:.2f} bits/value at 8K; {ratio}")
    body = "\n".join(lines) + (
        f"\n\nllama-perplexity -c 2048 -b 32 -ub 32 --chunks {args.chunks} on Pride and Prejudice (the second half of "
        "each chunk is scored; every decode call adds 32 tokens, so nearly all attended tokens come from the "
        "compressed cache); KLD and top-1 against the f16 cache's logits. Bits/value = KV bytes at 8K relative to "
        "f16 (AQUA-KV: codes, f16 scales, f16 sinks and recent window; its f32 reconstruction scratch lives in the "
        "compute buffer and is not counted). q8_0/q4_0 use flash attention and upstream's Hadamard rotation. "
        f"Speed: llama-bench -p 512 -n {args.gen_tokens} -d 0,2048 -t {args.threads} -r {args.reps}.\n\n"
        "Against the targets of the fast-decode issue (mean KLD ≤ 1/3 of q4_0's, PPL ≤ +1%, ≤ 2.6 bits/value, "
        "tg32 at depth 2048 ≥ 0.4× f16, pp512 at depth 2048 ≥ 0.9× f16):\n\n" + "\n".join(checks) + "\n\n"
        f"Benchmark time {time.perf_counter() - t0:.0f} s"
        f"{' (speed only; perplexity from the earlier run of the same day)' if args.reuse_perplexity else ''}; "
        f"raw outputs in `bench/results/{out_dir.name}/`. The AQUA-KV files are the converter's default "
        "calibration (131,072 tokens of five Austen novels) with the predictor form in the label.")
    print(body)
    if not args.no_write:
        write_section("cpu-cache", "AQUA-KV cache in llama.cpp on the CPU: SmolLM2-135M, predictor forms", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
