"""DESIGN §7 on the torch reference: perplexity, KL divergence and top-1 agreement vs the f16 cache.

Protocol: ``n_windows`` consecutive windows of ``window`` tokens of the evaluation text, each
fed from an empty cache in steps of ``step`` (32) tokens so nearly every attended token comes
from the cache.  Every position of a window except the last is scored: the logits at i predict
token i+1 (``window - 1`` scored tokens per window).  All modes run in lockstep on the same
steps, so the f16 run's distributions never need storing: mean KLD is
``mean_i Σ_v p_f16(v|i) (log p_f16(v|i) − log p_mode(v|i))`` and top-1 agreement is the share of
positions where both argmaxes coincide.

``python -m aquakv_gguf.eval.reference_eval MODEL.aqua.gguf`` runs f16, HIGGS and AQUA-KV of a
converted file (predictors read back from the GGUF).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from aquakv_gguf.calibrate.chain import GRID_DIM
from aquakv_gguf.calibrate.quantizer import bits_to_points
from aquakv_gguf.gguf_io.params import AquaKVParams
from aquakv_gguf.reference.accounting import bits_per_value

log = logging.getLogger(__name__)


@dataclass
class ModeSpec:
    """One cache configuration: mode "f16"/"off" (no bits), "higgs" (bits), "aqua" (params)."""

    name: str
    mode: str
    bits: int | None = None
    params: AquaKVParams | None = None
    layer0_bits: int | None = None


@dataclass
class ModeResult:
    """Scores of one mode over all windows; kld/top1 are vs the f16 run (0 and 1 for f16 itself).

    seconds is the wall time of the whole lockstep evaluation (all modes together).
    """

    name: str
    mode: str
    bits: int | None
    perplexity: float
    nll: float
    kld: float
    top1: float
    n_scored: int
    seconds: float
    bits_per_value: dict[int, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def eval_windows(tokens: Sequence[int], window: int, n_windows: int, bos_id: int | None = None) -> list[list[int]]:
    """The first ``n_windows`` back-to-back windows of ``window`` tokens (with bos_id in front if given)."""
    body = window - (bos_id is not None)
    if len(tokens) < body * n_windows:
        raise ValueError(f"need {body * n_windows} tokens for {n_windows} windows of {window}, have {len(tokens)}")
    head = [bos_id] if bos_id is not None else []
    return [head + list(tokens[i * body:(i + 1) * body]) for i in range(n_windows)]


def spec_row(spec: ModeSpec) -> dict[str, Any]:
    """AquaKVCache keyword arguments of one spec."""
    return dict(mode=spec.mode, params=spec.params, bits=spec.bits, layer0_bits=spec.layer0_bits)


def make_cache(model: nn.Module, spec: ModeSpec) -> Any:
    """An AquaKVCache for ``spec`` (import deferred: it loads transformers' cache classes)."""
    from aquakv_gguf.reference.cache import AquaKVCache

    return AquaKVCache(model, **spec_row(spec))


def spec_bits_per_value(model: nn.Module, spec: ModeSpec, n_tokens: int) -> float:
    """Bits per stored K/V value of ``spec`` at context ``n_tokens`` (DESIGN §3 accounting)."""
    from aquakv_gguf import quant

    cfg = model.config
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    c = int(cfg.num_key_value_heads) * head_dim
    common = dict(n_layers=int(cfg.num_hidden_layers), n_channels=c, prefix_tokens=4, recent_tokens=128)
    if spec.mode in ("f16", "off"):
        return bits_per_value(n_tokens, group_size=c, n_points=0, n_points0=None, **common)
    if spec.mode == "aqua":
        p = spec.params
        common.update(prefix_tokens=p.prefix_tokens, recent_tokens=p.recent_tokens)
        return bits_per_value(n_tokens, group_size=p.group_size, n_points=p.grid.shape[0],
                              n_points0=p.grid0.shape[0], **common)
    return bits_per_value(n_tokens, group_size=quant.choose_group_size(c, head_dim),
                          n_points=bits_to_points(spec.bits, GRID_DIM),
                          n_points0=bits_to_points(spec.layer0_bits, GRID_DIM) if spec.layer0_bits else None, **common)


def cache_kwarg(model: nn.Module) -> str:
    """Name of the forward argument that takes a Cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_with_cache(model: nn.Module, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """Logits ``[B, T, V]`` of ``ids: [B, T]`` appended to ``cache``."""
    return model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache}).logits


@torch.no_grad()
def stepwise_logits(model: nn.Module, ids: torch.Tensor, cache: Any, step: int) -> torch.Tensor:
    """Logits ``[B, T, V]`` (float32) of ``ids: [B, T]`` fed into ``cache`` in ``step``-token steps."""
    out = []
    for s in range(0, ids.shape[1], step):
        out.append(forward_with_cache(model, ids[:, s:s + step], cache).float())
    return torch.cat(out, dim=1)


@torch.no_grad()
def evaluate_reference(model: nn.Module, windows: list[list[int]], specs: list[ModeSpec], *, step: int = 32,
                       progress: bool = True, contexts: Sequence[int] = (8192, 32768)) -> dict[str, ModeResult]:
    """Score every spec on every window in lockstep with an f16 baseline (added if absent).

    All specs run as the rows of one batch (one AquaKVCache with a configuration per row), so
    each step reads the weights once for every mode; rows never interact.
    """
    from aquakv_gguf.calibrate.allocator import keep_freed_memory
    from aquakv_gguf.reference.cache import AquaKVCache

    keep_freed_memory()
    if not any(s.mode == "f16" for s in specs):
        specs = [ModeSpec("f16", "f16")] + list(specs)
    base = next(i for i, s in enumerate(specs) if s.mode == "f16")
    device = next(model.parameters()).device
    n_modes = len(specs)
    nll = np.zeros(n_modes)
    kld = np.zeros(n_modes)
    agree = np.zeros(n_modes)
    n_scored = 0
    t_start = time.perf_counter()
    total_steps = sum(math.ceil(len(w) / step) for w in windows)
    bar = tqdm(total=total_steps, desc=f"reference eval ({n_modes} modes)", unit="step", disable=not progress)
    for win in windows:
        ids = torch.tensor([win], dtype=torch.long, device=device).expand(n_modes, -1).contiguous()
        cache = AquaKVCache(model, rows=[spec_row(s) for s in specs])
        for s in range(0, ids.shape[1], step):
            e = min(ids.shape[1], s + step)
            # Position i predicts token i+1: the window's last position has no target.
            n_tgt = min(e, ids.shape[1] - 1) - s
            targets = ids[0, s + 1:s + 1 + n_tgt]
            logits = forward_with_cache(model, ids[:, s:e], cache)[:, :n_tgt]
            logp = torch.log_softmax(logits.double(), dim=-1)  # [modes, n_tgt, V]
            nll += (-logp.gather(2, targets.view(1, -1, 1).expand(n_modes, -1, 1))).sum(dim=(1, 2)).cpu().numpy()
            ref = logp[base]
            kld += (ref.exp() * (ref - logp)).sum(dim=(1, 2)).cpu().numpy()
            agree += (logp.argmax(-1) == ref.argmax(-1)).sum(dim=1).cpu().numpy()
            n_scored += n_tgt
            bar.update(1)
        cache.close()
    bar.close()
    seconds = time.perf_counter() - t_start
    log.info("evaluated %d modes on %d windows (%d scored tokens each) in %.1f s", n_modes, len(windows), n_scored,
             seconds)
    results = {}
    for i, spec in enumerate(specs):
        results[spec.name] = ModeResult(
            name=spec.name, mode=spec.mode, bits=spec.bits if spec.mode != "aqua" else int(round(spec.params.bits)),
            perplexity=math.exp(nll[i] / n_scored), nll=nll[i] / n_scored, kld=max(0.0, kld[i] / n_scored),
            top1=agree[i] / n_scored, n_scored=n_scored, seconds=seconds,
            bits_per_value={n: spec_bits_per_value(model, spec, n) for n in contexts})
    return results


def format_table(results: dict[str, ModeResult], baseline: str = "f16") -> str:
    """Markdown table: mode, bits/value at 8K/32K, perplexity, relative change, mean KLD, top-1."""
    base = results[baseline].perplexity
    rows = ["| mode | bits/value @8K | @32K | perplexity | vs f16 | mean KLD | top-1 vs f16 |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results.values():
        bpv = [r.bits_per_value.get(n, float("nan")) for n in (8192, 32768)]
        rows.append(f"| {r.name} | {bpv[0]:.3f} | {bpv[1]:.3f} | {r.perplexity:.4f} | "
                    f"{100 * (r.perplexity / base - 1):+.2f}% | {r.kld:.5f} | {100 * r.top1:.2f}% |")
    return "\n".join(rows)


def load_model_and_tokenizer(path: Path, device: str = "cpu") -> tuple[nn.Module, Any]:
    """transformers model (float32) + tokenizer of a GGUF file or a Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.is_file():
        kw = dict(gguf_file=path.name)
        src = str(path.parent)
    else:
        kw, src = {}, str(path)
    tok = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw).to(device).eval()
    return model, tok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aquakv_gguf.eval.reference_eval", description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, help="a model.aqua.gguf written by aquakv_gguf.convert")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--step", type=int, default=32)
    ap.add_argument("--higgs-bits", type=int, nargs="*", default=None, help="HIGGS bit widths (default: the file's)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from aquakv_gguf.assets import evaluation_text
    from aquakv_gguf.calibrate.text import adds_bos, tokenize_text
    from aquakv_gguf.gguf_io import AquaKVFormatError, read_aqua_gguf

    try:
        params = read_aqua_gguf(args.model)
    except AquaKVFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model, tok = load_model_and_tokenizer(args.model, args.device)
    ids = tokenize_text(tok, evaluation_text())
    wins = eval_windows(ids, args.window, args.windows, tok.bos_token_id if adds_bos(tok) else None)
    bits = int(round(params.bits))
    specs = [ModeSpec("f16", "f16")]
    specs += [ModeSpec(f"higgs {b}-bit", "higgs", bits=b) for b in (args.higgs_bits or [bits])]
    specs.append(ModeSpec(f"aqua {bits}-bit", "aqua", params=params))
    results = evaluate_reference(model, wins, specs, step=args.step)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
