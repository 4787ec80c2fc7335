"""Measure AQUA-KV on the torch reference (issue 3, "Measure and record") and write docs/RESULTS.md.

1. Convert SmolLM2-135M (embedded Q4_1 GGUF) with ``python -m aquakv_gguf.convert --bits 2 --also 3:...``
   (one pass over the model calibrates both bit widths on >= 256k tokens of the five calibration
   novels), timing the conversion and reading its peak RSS from ``wait4``.
2. Convert it again with the converter's defaults (2-bit, the recipe's default token count), timed
   the same way: the conversion a user runs, and the one the 10-minute bound applies to.
3. Evaluate on 12 windows of 2048 tokens of Pride and Prejudice fed in 32-token steps (DESIGN §7):
   f16, HIGGS 2/3/4-bit (no predictors), AQUA-KV 2/3-bit read back from the written GGUFs, and
   AQUA-KV 2-bit from the default conversion.
3. Check the acceptance bounds and write the "reference" section of docs/RESULTS.md.

Smaller settings (``--calib-tokens``, ``--windows``) are for trial runs; ``--reuse`` skips the
conversion when its outputs already exist in ``bench/work``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from aquakv_gguf.assets import evaluation_text, smollm2_gguf
from aquakv_gguf.calibrate.text import adds_bos, tokenize_text
from aquakv_gguf.eval.reference_eval import (
    ModeSpec,
    eval_windows,
    evaluate_reference,
    format_table,
    load_model_and_tokenizer,
)
from aquakv_gguf.gguf_io import read_aqua_gguf

log = logging.getLogger("bench_reference")
WORK = REPO / "bench" / "work"


def run_convert(model: Path, outs: dict[int, Path], calib_tokens: int | None, extra: list[str],
                tag: str = "convert") -> dict:
    """One converter run (child process) writing every bit width of ``outs`` in a single model pass.

    ``calib_tokens`` None leaves the converter's default.  Returns wall time, the child's peak
    RSS (``wait4``), the load average around the run and the converter's JSON summary.
    """
    (main_bits, main_out), *others = outs.items()
    summary_json = WORK / f"{tag}_summary.json"
    tokens = [] if calib_tokens is None else ["--calib-tokens", str(calib_tokens)]
    cmd = [sys.executable, "-m", "aquakv_gguf.convert", str(model), "--out", str(main_out), "--bits", str(main_bits),
           *tokens, "--force", "--summary-json", str(summary_json), *extra]
    for b, path in others:
        cmd += ["--also", f"{b}:{path}"]
    log.info("running %s", " ".join(cmd))
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    log_path = WORK / f"{tag}.log"
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"conversion failed (exit {rc}); see {log_path}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024.0, "cmd": " ".join(cmd[1:]),
            "load_before": load_before, "load_after": os.getloadavg()[0],
            "summary": json.loads(summary_json.read_text())}


def converted(model: Path, outs: dict[int, Path], calib_tokens: int | None, extra: list[str], tag: str,
              reuse: bool) -> dict:
    """``run_convert``, or with ``reuse`` its record in ``bench/work/<tag>.json`` when the outputs exist."""
    record = WORK / f"{tag}.json"
    if reuse and record.exists() and all(p.exists() for p in outs.values()):
        return json.loads(record.read_text())
    conv = run_convert(model, outs, calib_tokens, extra, tag)
    record.write_text(json.dumps(conv, indent=1))
    return conv


def relmse_table(params_by_bits: dict[int | str, object]) -> str:
    """Per-layer held-out relative MSE (from the GGUF's aquakv.calibration.* metadata), compacted."""
    rows = ["| bits | key pred (mean l≥1) | value pred | key recon (AQUA) | value recon (AQUA) | layers: key pred min / max |",
            "|---:|---:|---:|---:|---:|---|"]
    for bits, p in params_by_bits.items():
        c = p.calibration
        kp, vp, k, v = (np.asarray(c[n][1:]) for n in ("k_pred_relmse", "v_pred_relmse", "k_relmse", "v_relmse"))
        rows.append(f"| {bits} | {kp.mean():.4f} | {vp.mean():.4f} | {k.mean():.5f} | {v.mean():.5f} | "
                    f"{kp.min():.3f} (layer {int(kp.argmin()) + 1}) / {kp.max():.3f} (layer {int(kp.argmax()) + 1}) |")
    return "\n".join(rows)


def per_layer_rows(p) -> str:
    c = p.calibration
    rows = ["| layer | key pred | value pred | key recon | value recon |", "|---:|---:|---:|---:|---:|"]
    for i in range(len(c["k_pred_relmse"])):
        rows.append(f"| {i} | {c['k_pred_relmse'][i]:.4f} | {c['v_pred_relmse'][i]:.4f} | {c['k_relmse'][i]:.5f} | "
                    f"{c['v_relmse'][i]:.5f} |")
    return "\n".join(rows)


@torch.no_grad()
def sanity_perplexity(model, ids: list[int], n_windows: int = 40, window: int = 512) -> float:
    """DESIGN §6 known figure: first 40 windows of 512 tokens, full windows, plain transformers (25.5)."""
    nll, n = 0.0, 0
    for i in range(n_windows):
        w = torch.tensor([ids[i * window:(i + 1) * window]])
        logp = torch.log_softmax(model(input_ids=w).logits[0, :-1].double(), -1)
        nll += float(-logp.gather(1, w[0, 1:, None]).sum())
        n += window - 1
    return math.exp(nll / n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib-tokens", type=int, default=262144)
    ap.add_argument("--default-tokens", type=int, default=None,
                    help="calibration tokens of the 'default' conversion (trial runs only; default: the converter's)")
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--step", type=int, default=32)
    ap.add_argument("--reuse", action="store_true", help="reuse bench/work/*.aqua.gguf when present")
    ap.add_argument("--no-sanity", action="store_true", help="skip the 40 x 512 plain-transformers perplexity")
    ap.add_argument("--no-write", action="store_true", help="do not touch docs/RESULTS.md")
    ap.add_argument("--convert-args", default="", help="extra converter arguments, space separated")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads for conversion and evaluation "
                    "(default: torch's choice; 1 is faster while other jobs share the cores)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    WORK.mkdir(parents=True, exist_ok=True)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    model_path = smollm2_gguf()

    extra = args.convert_args.split() + (["--threads", str(args.threads)] if args.threads > 0 else [])
    outs = {bits: WORK / f"smollm2-135m.aqua{bits}.gguf" for bits in (2, 3)}
    conversion = converted(model_path, outs, args.calib_tokens, extra, "convert", args.reuse)
    log.info("conversion (2 and 3 bits in one pass): %.1f min, peak RSS %.0f MiB", conversion["wall_s"] / 60,
             conversion["peak_rss_mib"])
    default_out = {2: WORK / "smollm2-135m.default.aqua2.gguf"}
    default_conv = converted(model_path, default_out, args.default_tokens, extra, "convert_default", args.reuse)
    log.info("default conversion (2-bit, %d tokens): %.1f min, peak RSS %.0f MiB",
             default_conv["summary"]["calib_tokens"], default_conv["wall_s"] / 60, default_conv["peak_rss_mib"])
    params = {bits: read_aqua_gguf(path) for bits, path in outs.items()}
    default_params = read_aqua_gguf(default_out[2])
    default_label = f"AQUA-KV 2-bit, default ({default_params.calibration.get('tokens')} tokens)"

    model, tok = load_model_and_tokenizer(model_path)
    ids = tokenize_text(tok, evaluation_text()).tolist()
    sanity = None
    if not args.no_sanity:
        t0 = time.perf_counter()
        sanity = sanity_perplexity(model, ids)
        log.info("sanity perplexity (40 x 512, full windows, f32): %.3f (DESIGN §6: 25.5) in %.0f s", sanity,
                 time.perf_counter() - t0)
    wins = eval_windows(ids, args.window, args.windows, tok.bos_token_id if adds_bos(tok) else None)
    specs = [ModeSpec("f16", "f16")]
    specs += [ModeSpec(f"HIGGS {b}-bit", "higgs", bits=b) for b in (2, 3, 4)]
    specs += [ModeSpec(f"AQUA-KV {b}-bit", "aqua", params=params[b]) for b in (2, 3)]
    specs += [ModeSpec(default_label, "aqua", params=default_params)]
    t0 = time.perf_counter()
    results = evaluate_reference(model, wins, specs, step=args.step)
    eval_s = time.perf_counter() - t0
    table = format_table(results)
    print(table)

    r = results
    f16_ppl = r["f16"].perplexity
    checks: dict[str, bool] = {
        "AQUA-KV 2-bit KLD <= 1/5 of HIGGS 2-bit": bool(r["AQUA-KV 2-bit"].kld <= r["HIGGS 2-bit"].kld / 5),
        "AQUA-KV 2-bit perplexity within +1% of f16": bool(r["AQUA-KV 2-bit"].perplexity <= 1.01 * f16_ppl),
        "AQUA-KV 3-bit KLD <= 1/5 of HIGGS 3-bit": bool(r["AQUA-KV 3-bit"].kld <= r["HIGGS 3-bit"].kld / 5),
        "default conversion (2-bit) <= 10 min": bool(default_conv["wall_s"] <= 600),
        f"conversion on {conversion['summary']['calib_tokens']} tokens <= 10 min (2- and 3-bit together)":
            bool(conversion["wall_s"] <= 600),
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    (WORK / "bench_reference.json").write_text(json.dumps(
        {"results": {k: v.as_dict() for k, v in results.items()}, "checks": checks,
         "conversion": conversion, "default_conversion": default_conv,
         "sanity_ppl": sanity, "eval_s": eval_s}, indent=1))

    p2 = params[2]

    def phases(conv: dict) -> str:
        return ", ".join(f"{k} {v:.0f} s" for k, v in conv["summary"]["timings"].items())

    def load(conv: dict) -> str:
        return f"load average {conv['load_before']:.1f} before, {conv['load_after']:.1f} after"

    body = f"""SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized by transformers, float32 on CPU), torch reference cache
(`aquakv_gguf.reference.AquaKVCache`). Calibration: {p2.calibration.get('tokens')} tokens
({p2.calibration.get('sequences')} sequences x {p2.calibration.get('seq_len')}) of the five calibration novels,
{p2.calibration.get('heldout_tokens')} held-out tokens for the errors below. Evaluation: {args.windows} windows x {args.window}
tokens of Pride and Prejudice, each from an empty cache, fed in {args.step}-token steps; every position but the
last of a window is scored ({r['f16'].n_scored} tokens). KLD and top-1 are vs the f16 cache on the same steps.
Sinks P = {p2.prefix_tokens}, window W = {p2.recent_tokens}, group size {p2.group_size}, HIGGS grids 2-D
(16/64/256 points); AQUA-KV layer 0 at 4 bits. Bits per value count codes, f16 scales and the f16 sinks and
recent window at that context (DESIGN §3).

{table}

Acceptance: {'; '.join(f"{'PASS' if ok else 'FAIL'} {name}" for name, ok in checks.items())}.

Predictors: {p2.predictor_bytes() / 2**20:.2f} MiB per model (f16 weights, f32 biases; same for 2 and 3 bits).

Conversion, calibration included, on this machine (torch threads: {args.threads or torch.get_num_threads()}; peak RSS of the
child process from `wait4`):

- `python -m aquakv_gguf.convert {conversion['cmd'].split(' ', 2)[-1]}`
  writes both files in one pass over the model (2- and 3-bit chains share the captured K/V):
  wall time {conversion['wall_s'] / 60:.1f} min ({phases(conversion)}), peak RSS {conversion['peak_rss_mib']:.0f} MiB
  ({load(conversion)}).
- With the converter's defaults (2-bit, {default_conv['summary']['calib_tokens']} calibration tokens: the recipe's default),
  `python -m aquakv_gguf.convert {default_conv['cmd'].split(' ', 2)[-1]}`:
  wall time {default_conv['wall_s'] / 60:.1f} min ({phases(default_conv)}), peak RSS {default_conv['peak_rss_mib']:.0f} MiB
  ({load(default_conv)}). Its row in the table above ("{default_label}") is the quality a user gets.

Held-out relative MSE (Σ‖y−ŷ‖²/Σ‖y‖², sinks excluded) of the predictors alone and of the AQUA-KV reconstructions:

{relmse_table({**params, "2, default": default_params})}

<details><summary>Per layer, 2-bit</summary>

{per_layer_rows(p2)}

</details>

Sanity check: plain transformers perplexity on the first 40 windows of 512 tokens = {f'{sanity:.2f}' if sanity else 'not run'}
(DESIGN §6 quotes 25.5). Evaluation wall time {eval_s / 60:.1f} min; whole benchmark {(time.perf_counter() - t_all) / 60:.1f} min.
"""
    if not args.no_write:
        from results_md import write_section

        write_section("reference", "AQUA-KV torch reference: SmolLM2-135M quality and conversion cost", body)
        log.info("wrote the 'reference' section of docs/RESULTS.md")
    else:
        print(body)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
