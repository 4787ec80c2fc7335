"""Fit the chained AQUA-KV predictors layer by layer (DESIGN §3).

Layer 0: ``k̂_0 = Q₀(k_0)``, ``v̂_0 = Q₀(v_0)`` with the 4-bit grid.
Layer l >= 1: ``p = A_l k̂_{l-1} + a_l``, ``k̂_l = p + Q(k_l − p)``;
``q = B_K k̂_l + B_V v̂_{l-1} + b_l``, ``v̂_l = q + Q(v_l − q)``.

The predictor inputs are the reconstructions, exactly as inference computes them (including the
f16 rounding of the stored weights), so the fit sees the same inputs the cache will give it.
Each sequence's first ``prefix_tokens`` tokens (attention sinks, kept in f16 at inference) are
left out of fitting and of the reported errors.  Several bit widths may be fitted in one pass
over the model: they share the captured K/V and each keeps its own reconstruction chain.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from aquakv_gguf import quant
from aquakv_gguf.gguf_io.params import AquaKVParams, LayerPredictor
from aquakv_gguf.reference.semantics import predict_keys, predict_values, residual_quantize

from .capture import LayerwiseRunner
from .errors import CalibrationTextError
from .quantizer import RowQuantizer, bits_to_points, key_quantizer
from .recipes import Recipe
from .ridge import ErrorAccumulator, RidgeAccumulator

log = logging.getLogger(__name__)

GRID_DIM = 2
LAYER0_BITS = 4
_ROW_CHUNK = 32768


@dataclass
class LayerReport:
    """Held-out relative MSE (Σ‖y−ŷ‖² / Σ‖y‖²) of one layer at one bit width.

    k_pred/v_pred: of the predictions p, q alone (1.0 at layer 0, which has none);
    k/v: of the final reconstructions k̂, v̂; k_higgs/v_higgs: of plain Q(k), Q(v) at the same
    bits, for comparison.
    """

    layer: int
    k_pred: float
    v_pred: float
    k: float
    v: float
    k_higgs: float
    v_higgs: float


@dataclass
class CalibrationResult:
    """params[bits]: AquaKVParams in Hugging Face channel order; reports[bits]: per-layer errors."""

    params: dict[int, AquaKVParams]
    reports: dict[int, list[LayerReport]]
    n_sequences: int
    seq_len: int
    train_tokens: int
    heldout_tokens: int
    seconds: float
    peak_rss_mib: float
    timings: dict[str, float] = field(default_factory=dict)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _row_chunks(n: int, chunk: int = _ROW_CHUNK) -> Iterable[slice]:
    for s in range(0, n, chunk):
        yield slice(s, min(n, s + chunk))


def _round_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return w.to(dtype).to(torch.float32)


class _Chain:
    """Reconstruction state of one bit width: k̂_{l-1}, v̂_{l-1} ``[N, C]`` and the fitted layers."""

    def __init__(self, bits: int, grid: np.ndarray, quantizer: RowQuantizer, key_q):
        self.bits, self.grid, self.q, self.qk = bits, grid, quantizer, key_q
        self.k_prev: torch.Tensor | None = None
        self.v_prev: torch.Tensor | None = None
        self.predictors: list[LayerPredictor | None] = []
        self.reports: list[LayerReport] = []


def calibrate(model: nn.Module, recipe: Recipe, input_ids: torch.Tensor, heldout: torch.Tensor, *,
              bits: Iterable[int] = (2,), group_size: int | None = None, prefix_tokens: int = 4,
              recent_tokens: int = 128, reg: float | None = None, batch_size: int | None = None,
              device: torch.device | str = "cpu", weight_dtype: torch.dtype = torch.float16,
              calibration_meta: dict[str, Any] | None = None, progress: bool = True) -> CalibrationResult:
    """Capture K/V layer by layer and fit the chained predictors for every bit width in ``bits``.

    input_ids: ``[n_seq, seq_len]``; heldout: ``[n_seq]`` bool.  ``group_size`` defaults to
    ``quant.choose_group_size(C, head_dim)``.  The model must already be on ``device``.
    """
    t_start = time.perf_counter()
    device = torch.device(device)
    reg = recipe.reg if reg is None else reg
    bits = sorted({int(b) for b in bits})
    config = model.config
    n_layers = int(config.num_hidden_layers)
    n_kv = int(config.num_key_value_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    c = n_kv * head_dim
    group = int(group_size or quant.choose_group_size(c, head_dim))
    n_seq, seq_len = input_ids.shape
    if seq_len <= prefix_tokens:
        raise CalibrationTextError(f"calibration sequences of {seq_len} tokens leave nothing after {prefix_tokens} sinks")

    # Row masks over [n_seq * seq_len] tokens, sequence-major like the runner's output.
    pos = torch.arange(seq_len).repeat(n_seq)
    seq_held = heldout.to(torch.bool).repeat_interleave(seq_len)
    sink = pos < prefix_tokens
    train_rows = (~sink & ~seq_held).to(device)
    held_rows = (~sink & seq_held).to(device)
    sink = sink.to(device)
    n_train, n_held = int(train_rows.sum()), int(held_rows.sum())
    if n_train < 2 * c + 1:
        raise CalibrationTextError(
            f"calibration text too short: {n_train} training tokens for {2 * c + 1} predictor inputs per channel")

    grid0 = quant.gaussian_grid(bits_to_points(LAYER0_BITS, GRID_DIM), dim=GRID_DIM)
    q0 = RowQuantizer(grid0, group)
    permutes = recipe.llama_cpp_permutes_qk
    q0k = key_quantizer(q0, n_kv, head_dim, permutes)  # keys in llama.cpp channel order
    chains = []
    for b in bits:
        grid = quant.gaussian_grid(bits_to_points(b, GRID_DIM), dim=GRID_DIM)
        q = RowQuantizer(grid, group)
        chains.append(_Chain(b, grid, q, key_quantizer(q, n_kv, head_dim, permutes)))

    runner = LayerwiseRunner(model, recipe, input_ids, batch_size=batch_size or recipe.calib_batch_size, device=device)
    if runner.n_layers != n_layers:
        raise CalibrationTextError(f"recipe finds {runner.n_layers} layers, config says {n_layers}")
    timings = {"capture": 0.0, "fit": 0.0, "quantize": 0.0}
    bar = tqdm(range(n_layers), desc="calibrating layers", unit="layer", disable=not progress)
    for layer in bar:
        t0 = time.perf_counter()
        k, v = runner.next_layer()
        if k.shape[1] != c:
            raise CalibrationTextError(f"layer {layer}: captured {k.shape[1]} key channels, expected {c}")
        timings["capture"] += time.perf_counter() - t0
        k_sink, v_sink = k[sink].half().float(), v[sink].half().float()
        if layer == 0:
            # Layer 0 is the same for every bit width (4-bit grid0, no predictor): quantize once.
            t1 = time.perf_counter()
            k0_hat, v0_hat = q0k(k), q0(v)
            timings["quantize"] += time.perf_counter() - t1
        for ch in chains:
            if layer == 0:
                k_hat, v_hat = k0_hat, v0_hat
                k_pred_err, v_pred_err = 1.0, 1.0
                ch.predictors.append(None)
            else:
                k_hat, v_hat, k_pred_err, v_pred_err = _fit_layer(ch, k, v, train_rows, held_rows, reg,
                                                                  weight_dtype, timings)
            # Sinks stay f16 at inference; the next layer's predictors never see them (excluded from fits).
            k_hat[sink], v_hat[sink] = k_sink, v_sink
            ch.reports.append(LayerReport(
                layer=layer, k_pred=k_pred_err, v_pred=v_pred_err,
                k=_rel(k, k_hat, held_rows), v=_rel(v, v_hat, held_rows),
                k_higgs=_rel_selected(k[held_rows], ch.q(k[held_rows])),
                v_higgs=_rel_selected(v[held_rows], ch.q(v[held_rows]))))
            ch.k_prev, ch.v_prev = k_hat, v_hat
        del k, v
        r = chains[0].reports[-1]
        bar.set_postfix_str(f"{chains[0].bits}b k {r.k_pred:.3f}/{r.k:.4f} v {r.v_pred:.3f}/{r.v:.4f}")
        log.debug("layer %d done in %.1f s", layer, time.perf_counter() - t0)
    bar.close()

    seconds = time.perf_counter() - t_start
    params, reports = {}, {}
    for ch in chains:
        meta = dict(calibration_meta or {})
        meta.update({
            "sequences": int(n_seq), "seq_len": int(seq_len), "train_tokens": n_train, "heldout_tokens": n_held,
            "reg": float(reg), "bits": int(ch.bits),
            "k_pred_relmse": [r.k_pred for r in ch.reports], "v_pred_relmse": [r.v_pred for r in ch.reports],
            "k_relmse": [r.k for r in ch.reports], "v_relmse": [r.v for r in ch.reports],
        })
        params[ch.bits] = AquaKVParams(
            grid=ch.grid, grid0=grid0, group_size=group, prefix_tokens=prefix_tokens, recent_tokens=recent_tokens,
            n_layers=n_layers, n_kv_heads=n_kv, head_dim=head_dim, predictors=ch.predictors, channel_order="hf",
            calibration=meta)
        reports[ch.bits] = ch.reports
    timings["total"] = seconds
    log.info("calibrated %d layers on %d train / %d held-out tokens in %.1f s (capture %.1f s, fit %.1f s, "
             "quantize %.1f s), peak RSS %.0f MiB", n_layers, n_train, n_held, seconds, timings["capture"],
             timings["fit"], timings["quantize"], peak_rss_mib())
    return CalibrationResult(params=params, reports=reports, n_sequences=int(n_seq), seq_len=int(seq_len),
                             train_tokens=n_train, heldout_tokens=n_held, seconds=seconds,
                             peak_rss_mib=peak_rss_mib(), timings=timings)


def _rel(y: torch.Tensor, y_hat: torch.Tensor, rows: torch.Tensor) -> float:
    """Relative MSE of ``y_hat`` vs ``y`` (both ``[N, C]``) over the boolean ``rows``."""
    acc = ErrorAccumulator()
    acc.add(y[rows], y_hat[rows])
    return acc.rel


def _rel_selected(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """Relative MSE of already-selected rows ``[n, C]``."""
    acc = ErrorAccumulator()
    acc.add(y, y_hat)
    return acc.rel


def _predict(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``p = A k̂_{l-1} + a`` for ``x = k̂_{l-1}: [N, C]``, in row chunks (one token per row)."""
    out = torch.empty((x.shape[0], w.shape[0]), dtype=torch.float32, device=x.device)
    for sl in _row_chunks(x.shape[0]):
        out[sl] = predict_keys(x[sl], w, b)
    return out


def _fit(x_parts: list[torch.Tensor], y: torch.Tensor, rows: torch.Tensor, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge fit of ``y ≈ W [x_parts...] + b`` on ``rows``; inputs are concatenated chunk by chunk."""
    d_in = sum(x.shape[1] for x in x_parts)
    acc = RidgeAccumulator(d_in, y.shape[1], y.device)
    for sl in _row_chunks(y.shape[0]):
        m = rows[sl]
        if m.any():
            acc.add(torch.cat([x[sl][m] for x in x_parts], dim=1), y[sl][m])
    return acc.solve(reg)


def _fit_layer(ch: _Chain, k: torch.Tensor, v: torch.Tensor, train_rows: torch.Tensor, held_rows: torch.Tensor,
               reg: float, weight_dtype: torch.dtype, timings: dict[str, float]
               ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """One layer l >= 1 of one chain: returns ``(k̂_l, v̂_l, key pred relMSE, value pred relMSE)``."""
    c = k.shape[1]
    t0 = time.perf_counter()
    a_w, a_b = _fit([ch.k_prev], k, train_rows, reg)
    a_w = _round_weight(a_w, weight_dtype)
    p = _predict(a_w, a_b, ch.k_prev)
    timings["fit"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    k_hat = residual_quantize(k, p, ch.qk)
    timings["quantize"] += time.perf_counter() - t0
    k_pred_err = _rel(k, p, held_rows)
    del p

    t0 = time.perf_counter()
    b_w, b_b = _fit([k_hat, ch.v_prev], v, train_rows, reg)
    b_k, b_v = _round_weight(b_w[:, :c], weight_dtype), _round_weight(b_w[:, c:], weight_dtype)
    q = torch.empty_like(v)
    for sl in _row_chunks(v.shape[0]):
        q[sl] = predict_values(k_hat[sl], ch.v_prev[sl], b_k, b_v, b_b)
    timings["fit"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    v_hat = residual_quantize(v, q, ch.q)
    timings["quantize"] += time.perf_counter() - t0
    v_pred_err = _rel(v, q, held_rows)

    def np32(t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float32).numpy().copy()

    ch.predictors.append(LayerPredictor(k_weight=np32(a_w), k_bias=np32(a_b), v_weight_k=np32(b_k),
                                        v_weight_v=np32(b_v), v_bias=np32(b_b)))
    return k_hat, v_hat, k_pred_err, v_pred_err


def reports_as_dicts(reports: list[LayerReport]) -> list[dict[str, float]]:
    return [asdict(r) for r in reports]
