"""GPU benchmark of the AQUA-KV cache against llama.cpp's f16, q8_0 and q4_0 caches (issue 5).

``run`` (on the GPU machine, one call): writes synthetic Llama-3.2-1B- and Llama-3.1-8B-shaped
GGUFs with random Q4_0/Q8_0 weights and random AQUA-KV predictors of the right shapes
(aquakv_gguf.testing.synth_gguf: no checkpoint, no hub), then runs llama-bench side by side
for every cache: prompt processing (-p) and generation (-n) at each depth (-d), all layers on
the GPU, flash attention on, one repetition.  It polls nvidia-smi for the peak GPU memory of
each llama-bench process and measures the KV bytes at 32K context (AQUA-KV through the
bindings' cache_info, the ordinary caches from their exact per-value sizes).  Raw llama-bench
JSON, logs and a summary JSON go to --out.

``kv`` (anywhere): the AQUA-KV KV bytes at 32K cells, on KV twins of the shapes (same layers and
KV heads, tiny everything else), for entries a device run had no time to measure.

``report`` (anywhere): turns the summary JSONs into the "gpu-cache" table of docs/RESULTS.md.

Caches: f16, q8_0, q4_0 (the .aqua2 file with AQUAKV_ENABLED=0), aqua2 and aqua3 (dense
predictors, products in the default precision: f16 on the GPU), and the variants of docs/PERF.md:
aqua2-f32 (AQUAKV_PREDICT_PREC=f32), aqua2-blk (per-head block-diagonal predictors) and aqua2-lr
(low-rank predictors, ranks 32 for keys and 64 for values).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aquakv_gguf.convert import DEFAULT_PREDICTOR, parse_predictor  # noqa: E402

# aqua2-lr has the converter's default predictor form (DEFAULT_PREDICTOR); aqua2 is dense
DEFAULT_CACHE = "aqua2-lr"
_, _DEFAULT_RANK_K, _DEFAULT_RANK_V = parse_predictor(DEFAULT_PREDICTOR)
CACHES = ["f16", "aqua2", "aqua2-lr", "q8_0", "q4_0", "aqua3", "aqua2-blk", "aqua2-f32"]
BYTES_PER_VALUE = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
# the AQUA-KV files of each shape: synth_gguf.synthetic_aquakv_params arguments ("head": block = head_dim)
VARIANTS: dict[str, dict] = {
    "aqua2": {"n_points": 16},
    "aqua3": {"n_points": 64},
    "aqua2-blk": {"n_points": 16, "block_size": "head"},
    "aqua2-lr": {"n_points": 16, "rank_k": _DEFAULT_RANK_K, "rank_v": _DEFAULT_RANK_V},
}


def variant_params(variant: str, shape):
    """Random predictors of ``variant`` for ``shape`` (a synth_gguf.LlamaShape), seed 1."""
    from aquakv_gguf.testing.synth_gguf import synthetic_aquakv_params

    kw = dict(VARIANTS[variant])
    if kw.get("block_size") == "head":
        kw["block_size"] = shape.head_dim
    return synthetic_aquakv_params(shape, seed=1, **kw)


def _gpu_used_mib() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return int(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


class PeakGpuMemory:
    """Largest nvidia-smi memory.used (MiB) seen while the block runs, polled every 0.2 s."""

    def __init__(self) -> None:
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            used = _gpu_used_mib()
            if used is not None:
                self.peak = used if self.peak is None else max(self.peak, used)
            self._stop.wait(0.2)

    def __enter__(self) -> PeakGpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def write_models(shape_key: str, weights: str, work: Path, variants: list[str] | None = None) -> dict[str, Path]:
    """{variant: path} for the synthetic model of ``shape_key`` (the VARIANTS files, or those of ``variants``).

    Predictor scales: synth_gguf.synthetic_aquakv_params (bounded layer chain for every form).
    """
    from aquakv_gguf.testing.synth_gguf import SHAPES, write_synthetic_llama

    shape = SHAPES[shape_key]
    files = {}
    for variant in variants or VARIANTS:
        path = work / f"{shape_key}-{weights}.{variant}.gguf"
        if not path.exists():
            write_synthetic_llama(path, shape, weights=weights, aquakv=variant_params(variant, shape), seed=0)
        files[variant] = path
    return files


def variants_needed(caches: list[str]) -> list[str]:
    """The files a run of ``caches`` needs: the ordinary caches and aqua2-f32 run on the aqua2 file."""
    return list(dict.fromkeys(c if c in VARIANTS else "aqua2" for c in caches))


def cache_setup(cache: str, files: dict[str, Path]) -> tuple[Path, list[str], dict[str, str]]:
    """(model file, extra llama-bench args, extra environment) of one cache configuration."""
    if cache in BYTES_PER_VALUE:
        return files["aqua2"], ["-ctk", cache, "-ctv", cache], {"AQUAKV_ENABLED": "0"}
    if cache == "aqua2-f32":
        return files["aqua2"], [], {"AQUAKV_ENABLED": "1", "AQUAKV_PREDICT_PREC": "f32"}
    return files[cache], [], {"AQUAKV_ENABLED": "1", "AQUAKV_PREDICT_PREC": "auto"}


def kv_mib(cache: str, files: dict[str, Path], n_ctx: int, shape_key: str) -> float:
    """KV cache MiB at ``n_ctx`` cells: measured for AQUA-KV (codes + scales + f16 window), exact for the others."""
    from aquakv_gguf.testing.synth_gguf import SHAPES

    shape = SHAPES[shape_key]
    if cache in BYTES_PER_VALUE:
        return n_ctx * shape.n_layer * shape.n_kv_channels * 2 * BYTES_PER_VALUE[cache] / 2**20
    from aquakv_gguf.runtime import Model

    path, _, env = cache_setup(cache, files)
    os.environ.update(env)
    with Model(path, n_gpu_layers=99) as model, model.context(n_ctx=n_ctx, n_batch=512, n_ubatch=512) as ctx:
        info = ctx.cache_info()
    if info is None:
        raise RuntimeError(f"{path}: the AQUA-KV cache is not active")
    return (info["codes_bytes"] + info["window_bytes"]) / 2**20


def run(args: argparse.Namespace) -> int:
    from aquakv_gguf.paths import tool_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    bench = str(tool_path("llama-bench"))
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        gpu = "no GPU (nvidia-smi not found): CPU run"
    summary: dict = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "gpu": gpu,
                     "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "pp": args.pp, "tg": args.tg,
                     "depths": args.depths, "weights": args.weights, "shapes": {}}
    summary_path = out / "summary.json"
    for shape_key in args.shapes:
        t0 = time.perf_counter()
        files = write_models(shape_key, args.weights, work, variants_needed(args.caches))
        print(f"[bench] {shape_key}: models written in {time.perf_counter() - t0:.1f} s", flush=True)
        res: dict = {"caches": {}}
        summary["shapes"][shape_key] = res
        for cache in args.caches:
            left = deadline - time.monotonic()
            if left < 20:
                print(f"[bench] {shape_key} {cache}: skipped, {left:.0f} s of budget left", flush=True)
                res["caches"][cache] = {"skipped": "out of time budget"}
                continue
            path, extra, env = cache_setup(cache, files)
            cmd = [bench, "-m", str(path), "-ngl", "99", "-fa", "1", "-r", "1", "-p", str(args.pp), "-n", str(args.tg),
                   "-d", ",".join(map(str, args.depths)), "-o", "jsonl", *extra]
            t0 = time.perf_counter()
            with PeakGpuMemory() as peak:
                try:
                    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                                          timeout=max(10.0, left - 10))
                    rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
                except subprocess.TimeoutExpired as e:
                    # the partial output comes back as bytes even with text=True
                    def text(b: bytes | str | None) -> str:
                        return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
                    rc, stdout, stderr = -9, text(e.stdout), text(e.stderr) + "\n[bench] timed out"
            secs = time.perf_counter() - t0
            (out / f"{shape_key}-{cache}.jsonl").write_text(stdout)
            (out / f"{shape_key}-{cache}.log").write_text(" ".join(cmd) + "\n" + json.dumps(env) + "\n" + stderr[-20000:])
            entry: dict = {"rc": rc, "seconds": round(secs, 1), "peak_gpu_mib": peak.peak, "env": env}
            # one JSON line per finished test, so a run stopped by the time budget keeps what it measured
            for line in stdout.splitlines():
                try:
                    r = json.loads(line)
                    kind = "pp" if r["n_gen"] == 0 else "tg"
                    entry.setdefault(kind, {})[str(r["n_depth"])] = r["avg_ts"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
            if rc != 0:
                entry["error"] = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
            print(f"[bench] {shape_key} {cache}: rc {rc} in {secs:.1f} s, peak {peak.peak} MiB, "
                  f"pp {entry.get('pp')}, tg {entry.get('tg')}", flush=True)
            res["caches"][cache] = entry
            summary_path.write_text(json.dumps(summary, indent=1))
        for cache in args.caches:
            entry = res["caches"].get(cache, {})
            if "skipped" in entry or deadline - time.monotonic() < 15:
                continue
            try:
                entry["kv_mib_32k"] = round(kv_mib(cache, files, 32768, shape_key), 2)
            except Exception as e:  # noqa: BLE001 - recorded, the table shows it
                entry["kv_error"] = str(e)[:300]
        summary_path.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


def kv_twin(args: argparse.Namespace) -> int:
    """KV MiB at 32K cells of the AQUA-KV variants, measured on a KV twin of each shape.

    The cache's size depends only on the layers, KV heads, head size, grid and window, so a twin
    with those and a tiny everything else (4 MiB instead of 4.7 GiB) gives the same bytes on any
    machine; the result is a summary the report merges (it fills KV MiB where a device run had no
    time left to measure it).
    """
    from aquakv_gguf.runtime import Model
    from aquakv_gguf.testing.synth_gguf import SHAPES, LlamaShape, write_synthetic_llama

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "shapes": {}}
    for shape_key in args.shapes:
        real = SHAPES[shape_key]
        twin = LlamaShape(f"{real.name}-kv-twin", real.n_layer, real.n_kv_channels, real.n_head_kv, real.n_head_kv,
                          real.head_dim, 256, 512, tied_embeddings=True)
        caches = out["shapes"].setdefault(shape_key, {"caches": {}})["caches"]
        for variant in VARIANTS:
            path = write_synthetic_llama(work / f"{shape_key}-kv-twin.{variant}.gguf", twin,
                                         aquakv=variant_params(variant, twin), progress=False)
            with Model(path, n_gpu_layers=0) as model, model.context(n_ctx=32768, n_batch=512, n_ubatch=512) as ctx:
                info = ctx.cache_info()
            assert info is not None
            caches[variant] = {"kv_mib_32k": round((info["codes_bytes"] + info["window_bytes"]) / 2**20, 2)}
            if variant == "aqua2":
                caches["aqua2-f32"] = dict(caches[variant])
            print(f"[kv] {shape_key} {variant}: {caches[variant]['kv_mib_32k']} MiB at 32K cells", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


def _fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def report(args: argparse.Namespace) -> int:
    from results_md import write_section

    # several device calls may each have run part of the grid: later summaries fill in skipped entries
    s: dict = {}
    for path in args.summary:
        part = json.loads(Path(path).read_text())
        if not s:
            s = {**part, "shapes": {}, "commands": [], "dates": []}
        s["commands"].append(part["command"])
        s["dates"].append(part["date"])
        for shape_key, res in part["shapes"].items():
            caches = s["shapes"].setdefault(shape_key, {"caches": {}})["caches"]
            for cache, entry in res["caches"].items():
                if "skipped" not in entry:
                    caches[cache] = {**caches.get(cache, {}), **entry}
                elif cache not in caches:
                    caches[cache] = entry
    depths = [str(d) for d in s["depths"]]
    for shape_key, res in s["shapes"].items():
        for cache, e in res["caches"].items():
            if cache in BYTES_PER_VALUE and "kv_mib_32k" not in e and "skipped" not in e:
                e["kv_mib_32k"] = round(kv_mib(cache, {}, 32768, shape_key), 2)  # exact: no model needed
    lines = [f"Synthetic llama-architecture models with random {s['weights'].upper()} weights and random AQUA-KV "
             f"predictors (`aquakv_gguf/testing/synth_gguf.py`), llama-bench -ngl 99 -fa 1 -r 1, "
             f"pp{s['pp']} and tg{s['tg']} tokens/s at each depth; peak GPU memory from nvidia-smi during the run; "
             f"KV MiB at 32K cells (AQUA-KV: measured codes + scales + f16 window). Raw output: `{args.raw}`.", ""]
    for shape_key, res in s["shapes"].items():
        caches = res["caches"]
        f16 = caches.get("f16", {})
        # caches with only a KV twin measurement (not run on the device this time) get no row
        caches = {c: e for c, e in caches.items() if "skipped" in e or e.get("pp") or e.get("tg")}
        if not caches:
            continue
        head = (["cache", "KV MiB @32K", "KV vs f16", "peak GPU MiB"] + [f"pp d{d}" for d in depths]
                + [f"tg d{d}" for d in depths] + [f"pp/f16 d{depths[-1]}", f"tg/f16 d{depths[-1]}"])
        lines += [f"### {shape_key} shape", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for cache, e in caches.items():
            if "skipped" in e:
                lines.append(f"| {cache} | skipped: {e['skipped']} |" + " |" * (len(head) - 2))
                continue
            kv, kv16 = e.get("kv_mib_32k"), f16.get("kv_mib_32k")
            pp, tg = e.get("pp", {}), e.get("tg", {})
            last = depths[-1]

            def ratio(kind: str, e=e, last=last) -> str:
                a, b = e.get(kind, {}).get(last), f16.get(kind, {}).get(last)
                return "—" if a is None or not b else f"{a / b:.2f}×"

            row = [cache, _fmt(kv), "—" if kv is None or not kv16 else f"1/{kv16 / kv:.1f}", str(e.get("peak_gpu_mib"))]
            row += [_fmt(pp.get(d)) for d in depths] + [_fmt(tg.get(d)) for d in depths] + [ratio("pp"), ratio("tg")]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    # the targets are on the converter's default form (aquakv_gguf.convert.DEFAULT_PREDICTOR)
    c8 = s["shapes"].get("8b", {}).get("caches", {})
    default_cache = DEFAULT_CACHE if DEFAULT_CACHE in c8 else "aqua2"
    e8, f8 = c8.get(default_cache, {}), c8.get("f16", {})
    last = depths[-1]
    if e8.get("tg", {}).get(last) and f8.get("tg", {}).get(last):
        tg_r = e8["tg"][last] / f8["tg"][last]
        pp_r = e8["pp"][last] / f8["pp"][last]
        kv_r = f8["kv_mib_32k"] / e8["kv_mib_32k"] if e8.get("kv_mib_32k") and f8.get("kv_mib_32k") else float("nan")
        lines += [f"**Targets** (8B shape, depth {last}, AQUA-KV 2-bit {default_cache} vs f16): generation {tg_r:.2f}× "
                  f"(target ≥ 0.5×: {'met' if tg_r >= 0.5 else 'NOT met'}), prompt processing {pp_r:.2f}× "
                  f"(target ≥ 0.8×: {'met' if pp_r >= 0.8 else 'NOT met'}), KV at 32K 1/{kv_r:.1f} of f16 "
                  f"(target ≤ 1/6: {'met' if kv_r >= 6 else 'NOT met'}). Variants and profile: docs/PERF.md.", ""]
    write_section("gpu-cache", "GPU: AQUA-KV vs f16/q8_0/q4_0 caches (issue 5)", "\n".join(lines),
                  command=" ; ".join(dict.fromkeys(s["commands"])),
                  machine=s["gpu"] + f" (device machine), runs of {', '.join(s['dates'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="write the models and run llama-bench (GPU machine)")
    r.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=["1b", "8b", "tiny"])
    r.add_argument("--weights", default="q4_0", choices=["q4_0", "q8_0"])
    r.add_argument("--caches", nargs="+", default=CACHES, choices=CACHES)
    r.add_argument("--depths", nargs="+", type=int, default=[0, 4096, 16384, 32768])
    r.add_argument("--pp", type=int, default=512)
    r.add_argument("--tg", type=int, default=128)
    r.add_argument("--work", default="/tmp/aquakv-synth", help="folder for the synthetic GGUFs")
    r.add_argument("--out", required=True, help="folder for raw outputs and summary.json")
    r.add_argument("--budget-s", type=float, default=86400.0, help="stop starting new runs after this many seconds")
    p = sub.add_parser("report", help="write the docs/RESULTS.md table from a summary.json")
    p.add_argument("summary", nargs="+", help="summary.json files, later ones filling in what earlier ones skipped")
    p.add_argument("--raw", default="bench/results/", help="where the raw output is kept (named in the text)")
    k = sub.add_parser("kv", help="KV MiB of the AQUA-KV variants at 32K cells, on KV twins of the shapes (any machine)")
    k.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=["1b", "8b", "tiny"])
    k.add_argument("--work", default="/tmp/aquakv-kv-twins")
    k.add_argument("--out", required=True, help="summary JSON to pass to report after the device summaries")
    args = ap.parse_args(argv)
    return {"run": run, "report": report, "kv": kv_twin}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
