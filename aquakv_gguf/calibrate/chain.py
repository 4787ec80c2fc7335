"""Fit the chained AQUA-KV predictors layer by layer (DESIGN §3).

Layer 0: ``k̂_0 = Q₀(k_0)``, ``v̂_0 = Q₀(v_0)`` with the 4-bit grid.
Layer l >= 1: ``p = A_l k̂_{l-1} + a_l``, ``k̂_l = p + Q(k_l − p)``;
``q = B_K k̂_l + B_V v̂_{l-1} + b_l``, ``v̂_l = q + Q(v_l − q)``.  Low-rank predictors
(``predictor_form="lowrank"``) replace each weight by factors: ``p = U_k (D_k k̂_{l-1}) + a_l``,
``q = U_v (D_vk k̂_l + D_vv v̂_{l-1}) + b_l``.  With ``value_input="k_prev"`` the second value
input is k̂_{l-1} instead of v̂_{l-1}: values then have no chain of their own, which lets the
cache fold the value predictor onto the attention output (DESIGN §3).

The predictor inputs are the reconstructions, exactly as inference computes them (including the
f16 rounding of the stored weights), so the fit sees the same inputs the cache will give it.
Each sequence's first ``prefix_tokens`` tokens (attention sinks, kept in f16 at inference) are
left out of fitting and of the reported errors.  Several bit widths may be fitted in one pass
over the model: they share the captured K/V and each keeps its own reconstruction chain.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from aquakv_gguf import quant
from aquakv_gguf.gguf_io.params import (
    AquaKVParams,
    LayerPredictor,
    LowRankFactors,
    PredictorForm,
    ValueInput,
    check_predictor_form,
    check_value_input,
)
from aquakv_gguf.reference.semantics import predict_keys_lowrank, predict_values_lowrank

from .allocator import keep_freed_memory
from .capture import LayerwiseRunner
from .errors import CalibrationTextError
from .quantizer import RowQuantizer, bits_to_points, key_quantizer
from .recipes import Recipe
from .ridge import ErrorAccumulator, block_indices, solve_ridge

log = logging.getLogger(__name__)

GRID_DIM = 2
LAYER0_BITS = 4
_ROW_CHUNK = 65536  # rows per chunk of the moment products (float32 sums over at most this many rows)
_PREDICT_CHUNK = 2048  # rows per chunk of predict + residual quantization (stays in cache)


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
    """Slices of ``[0, n)`` of at most ``chunk`` rows."""
    for s in range(0, n, chunk):
        yield slice(s, min(n, s + chunk))


def _round_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return w.to(dtype).to(torch.float32)


def _train_mean(x: torch.Tensor, n_train: int) -> torch.Tensor:
    """Column means of the training rows ``x[:n_train]``: float64 ``[C]`` (float32 sums in cascade: accurate)."""
    return x[:n_train].sum(0).double() / n_train


class _Stats:
    """A reconstruction ``[N, C]`` (k̂ or v̂ of one layer) with its training-row statistics.

    Rows ``[0, n_train)`` are the training rows.  mean: ``[C]`` float64; xc: the training rows
    centred on the mean (float32 ``[n_train, C]``; ``release()`` drops it once no product needs
    it); gram: ``Σ (x − m)(x − m)ᵀ`` ``[C, C]`` float64.  A reconstruction is a predictor input
    twice: k̂_l in the value fit of layer l and the key fit of layer l + 1, v̂_l in the value fits
    of layer l + 1; its centred copy and Gram matrix are computed once and serve both.
    """

    def __init__(self, x: torch.Tensor, n_train: int, mean: torch.Tensor | None = None, moments: bool = True):
        self.x = x
        self.mean = _train_mean(x, n_train) if mean is None else mean
        # Centred, so that no product cancels large offsets (pre-RoPE keys carry per-channel means
        # much larger than their spread) in float32. moments=False: the rows are no predictor
        # input (v̂ with value input k_prev), so neither copy nor Gram matrix is made.
        self.xc: torch.Tensor | None = x[:n_train] - self.mean.to(torch.float32) if moments else None
        self.gram = _centred_products([(self.xc, self.xc)])[0] if moments else None

    def release(self) -> None:
        self.xc = None


def _centred_products(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """``Σ aᵀ b`` over rows for every ``(a: [n, C_a], b: [n, C_b])`` in ``pairs``: float64 ``[C_a, C_b]``.

    float32 products over chunks of rows, accumulated in float64.  With ``a`` centred on its
    training mean, ``Σ aᵀ b`` is already the centred cross-moment ``Σ (a − m_a)(b − m_b)ᵀ``
    (``Σ (a − m_a) = 0``), so regression targets never need a centred copy.
    """
    out = []
    for a, b in pairs:
        acc = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
        for sl in _row_chunks(a.shape[0]):
            acc += torch.mm(a[sl].T, b[sl]).double()
        out.append(acc)
    return out


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Temporarily run torch ops on ``n`` intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _predict_quantize(quantizer, x: torch.Tensor, predict, n_train: int, held_start: int
                      ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``x̂ = p + Q(x − p)`` with ``p = predict(rows)``, chunk by chunk (no full-size temporaries).

    x: ``[N, C]``.  Returns ``(x̂ [N, C], mean of x̂ over the training rows [C] float64, held-out
    relative MSE of p alone)``: each prediction chunk is used while in cache and then dropped.

    On the CPU the chunks go to one worker thread per torch thread, each running its ops
    single-threaded: the quantizer is many small ops per chunk, which intra-op threads barely
    speed up (measured on 2 cores: 1.16 s with 2 intra-op threads, 0.83 s with 2 workers).
    """
    out = torch.empty_like(x)
    chunks = list(_row_chunks(x.shape[0], _PREDICT_CHUNK))

    def work(part: list[slice]) -> tuple[torch.Tensor, ErrorAccumulator]:
        col_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        err = ErrorAccumulator()
        for sl in part:
            p = predict(sl)
            xs = x[sl]
            out[sl] = quantizer.quantize_residual(xs, p)
            if sl.start < n_train:
                col_sum += out[sl.start:min(sl.stop, n_train)].sum(0).double()
            if sl.stop > held_start:
                h = slice(max(sl.start, held_start) - sl.start, None)
                err.add(xs[h], p[h])
        return col_sum, err

    workers = torch.get_num_threads() if x.device.type == "cpu" else 1
    if workers > 1 and len(chunks) > 1:
        first = work(chunks[:1])  # first use in this thread: device tables and caches are built once, here
        with _torch_threads(1), ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(work, [chunks[1 + i::workers] for i in range(workers)]))
        results.append(first)
    else:
        results = [work(chunks)]
    col_sum = sum(r[0] for r in results)
    err = ErrorAccumulator()
    for _, e in results:
        err.err, err.ref, err.n = err.err + e.err, err.ref + e.ref, err.n + e.n
    return out, col_sum / n_train, err.rel


class _Chain:
    """Reconstruction state of one bit width: k̂_{l-1}, v̂_{l-1} ``[N, C]`` (with statistics) and the fitted layers."""

    def __init__(self, bits: int, grid: np.ndarray, quantizer: RowQuantizer, key_q):
        self.bits, self.grid, self.q, self.qk = bits, grid, quantizer, key_q
        self.k_prev: _Stats | None = None
        self.v_prev: _Stats | None = None
        self.predictors: list[LayerPredictor | None] = []
        self.reports: list[LayerReport] = []


def calibrate(model: nn.Module, recipe: Recipe, input_ids: torch.Tensor, heldout: torch.Tensor, *,
              bits: Iterable[int] = (2,), group_size: int | None = None, prefix_tokens: int = 4,
              recent_tokens: int = 128, reg: float | None = None, batch_size: int | None = None,
              device: torch.device | str = "cpu", weight_dtype: torch.dtype = torch.float16,
              predictor_block: int | None = None, predictor_form: PredictorForm = "dense", rank_k: int = 0,
              rank_v: int = 0, value_input: ValueInput = "v_prev",
              calibration_meta: dict[str, Any] | None = None, progress: bool = True) -> CalibrationResult:
    """Capture K/V layer by layer and fit the chained predictors for every bit width in ``bits``.

    input_ids: ``[n_seq, seq_len]``; heldout: ``[n_seq]`` bool.  ``group_size`` defaults to
    ``quant.choose_group_size(C, head_dim)``.  ``predictor_block`` N (dividing C; for recipes
    whose keys llama.cpp permutes, a multiple of head_dim so that the blocks survive the
    permutation) makes every predictor weight block-diagonal with ``[N, N]`` blocks; None or C
    is dense.  ``predictor_form="lowrank"`` with ``rank_k``/``rank_v`` (1..C) fits low-rank
    predictors instead (reduced-rank regression of the ridge solution, see ``_reduce_rank``);
    it does not combine with ``predictor_block``.  ``value_input`` ("v_prev" or "k_prev") is the
    value predictor's second input, v̂_{l-1} or k̂_{l-1}.  The model must already be on ``device``.

    Rows: each sequence's first ``prefix_tokens`` tokens are f16 sinks at inference at every
    layer, so they are neither fitted, scored nor used as predictor inputs: the runner drops
    them.  Training sequences are run first, so the training rows are one contiguous block
    ``[0, n_train)`` and the held-out rows the rest (no masks, no gathers).
    """
    t_start = time.perf_counter()
    keep_freed_memory()
    device = torch.device(device)
    reg = recipe.reg if reg is None else reg
    bits = sorted({int(b) for b in bits})
    config = model.config
    n_layers = int(config.num_hidden_layers)
    n_kv = int(config.num_key_value_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    c = n_kv * head_dim
    group = int(group_size or quant.choose_group_size(c, head_dim))
    permutes = recipe.llama_cpp_permutes_qk
    block = check_predictor_block(predictor_block, n_kv, head_dim, permutes)
    check_predictor_form(predictor_form, rank_k, rank_v, c, block)  # dense: both ranks 0
    ranks = (rank_k, rank_v) if predictor_form == "lowrank" else None
    check_value_input(value_input)
    n_seq, seq_len = input_ids.shape
    if seq_len <= prefix_tokens:
        raise CalibrationTextError(f"calibration sequences of {seq_len} tokens leave nothing after {prefix_tokens} sinks")

    held = heldout.to(torch.bool).cpu()
    order = torch.cat([torch.nonzero(~held).squeeze(1), torch.nonzero(held).squeeze(1)])
    n_train_seq = int((~held).sum())
    rows_per_seq = seq_len - prefix_tokens
    n_train, n_held = n_train_seq * rows_per_seq, (n_seq - n_train_seq) * rows_per_seq
    if n_train < 2 * c + 1:
        raise CalibrationTextError(
            f"calibration text too short: {n_train} training tokens for {2 * c + 1} predictor inputs per channel")
    held_rows = slice(n_train, n_train + n_held)

    grid0 = quant.gaussian_grid(bits_to_points(LAYER0_BITS, GRID_DIM), dim=GRID_DIM)
    q0 = RowQuantizer(grid0, group)
    # Keys are quantized in llama.cpp's channel order (the native cache's), folded into the Hadamard matrices.
    q0k = key_quantizer(q0, n_kv, head_dim, permutes, folded=True)
    chains = []
    for b in bits:
        grid = quant.gaussian_grid(bits_to_points(b, GRID_DIM), dim=GRID_DIM)
        q = RowQuantizer(grid, group)
        chains.append(_Chain(b, grid, q, key_quantizer(q, n_kv, head_dim, permutes, folded=True)))
    k_blocks = None if block == c else block_indices(c, block, 1)
    v_blocks = None if block == c else block_indices(c, block, 2)

    runner = LayerwiseRunner(model, recipe, input_ids[order], batch_size=batch_size or recipe.calib_batch_size,
                             device=device, skip_prefix=prefix_tokens, reuse_outputs=True)
    if runner.n_layers != n_layers:
        raise CalibrationTextError(f"recipe finds {runner.n_layers} layers, config says {n_layers}")
    timings = {"capture": 0.0, "fit": 0.0, "quantize": 0.0}
    bar = tqdm(range(n_layers), desc="calibrating layers", unit="layer", disable=not progress)
    for layer in bar:
        t0 = time.perf_counter()
        k, v = runner.next_layer()  # [n_train + n_held, C] each
        if k.shape[1] != c:
            raise CalibrationTextError(f"layer {layer}: captured {k.shape[1]} key channels, expected {c}")
        timings["capture"] += time.perf_counter() - t0
        k_held, v_held = k[held_rows], v[held_rows]
        if layer == 0:
            # Layer 0 is the same for every bit width (4-bit grid0, no predictor): quantize once.
            t1 = time.perf_counter()
            k0_hat, v0_hat = q0k(k), q0(v)
            timings["quantize"] += time.perf_counter() - t1
            t1 = time.perf_counter()
            k0_stats, v0_stats = _Stats(k0_hat, n_train), _Stats(v0_hat, n_train)
            timings["fit"] += time.perf_counter() - t1
        else:
            t1 = time.perf_counter()
            k_mean, v_mean = _train_mean(k, n_train), _train_mean(v, n_train)  # shared by the chains
            timings["fit"] += time.perf_counter() - t1
        prev = [(ch.k_prev, ch.v_prev) for ch in chains]
        for ch in chains:
            if layer == 0:
                k_hat, v_hat = k0_stats, v0_stats
                k_pred_err, v_pred_err = 1.0, 1.0
                ch.predictors.append(None)
            else:
                k_hat, v_hat, k_pred_err, v_pred_err = _fit_layer(
                    ch, k, v, k_mean, v_mean, n_train, reg, weight_dtype, k_blocks, v_blocks, ranks, value_input,
                    timings)
            t1 = time.perf_counter()
            # HIGGS without predictors, for comparison: on the held-out rows only (that is all it reports).
            k_higgs = _rel(k_held, ch.qk(k_held))
            v_higgs = _rel(v_held, ch.q(v_held))
            timings["quantize"] += time.perf_counter() - t1
            ch.reports.append(LayerReport(
                layer=layer, k_pred=k_pred_err, v_pred=v_pred_err,
                k=_rel(k_held, k_hat.x[held_rows]), v=_rel(v_held, v_hat.x[held_rows]),
                k_higgs=k_higgs, v_higgs=v_higgs))
            ch.k_prev, ch.v_prev = k_hat, v_hat
        # The previous layer's reconstructions are no predictor input any more: drop their centred copies.
        for st in (x for pair in prev for x in pair if x is not None):
            st.release()
        del k, v, k_held, v_held
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
            calibration=meta, predictor_block_size=0 if block == c else block, predictor_form=predictor_form,
            predictor_rank_k=rank_k, predictor_rank_v=rank_v, predictor_value_input=value_input)
        reports[ch.bits] = ch.reports
    timings["total"] = seconds
    log.info("calibrated %d layers on %d train / %d held-out tokens in %.1f s (capture %.1f s, fit %.1f s, "
             "quantize %.1f s), peak RSS %.0f MiB", n_layers, n_train, n_held, seconds, timings["capture"],
             timings["fit"], timings["quantize"], peak_rss_mib())
    return CalibrationResult(params=params, reports=reports, n_sequences=int(n_seq), seq_len=int(seq_len),
                             train_tokens=n_train, heldout_tokens=n_held, seconds=seconds,
                             peak_rss_mib=peak_rss_mib(), timings=timings)


def check_predictor_block(block: int | None, n_kv_heads: int, head_dim: int, permutes_qk: bool) -> int:
    """The predictor block size N to fit with (C for dense); raises ValueError when N is not allowed.

    N must divide C.  When llama.cpp permutes key channels (within each head), a block must hold
    whole heads, or the block-diagonal structure fitted in Hugging Face order would not survive
    the permutation into llama.cpp order.
    """
    c = n_kv_heads * head_dim
    if block is None or block == 0 or block == c:
        return c
    if block < 1 or c % block:
        raise ValueError(f"predictor block size {block} must divide C = {c}")
    if permutes_qk and block % head_dim:
        raise ValueError(f"predictor block size {block} must be a multiple of head_dim = {head_dim}: llama.cpp "
                         "permutes key channels within each head")
    return block


def _rel(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """Relative MSE ``Σ‖y−ŷ‖² / Σ‖y‖²`` of rows ``[n, C]``."""
    acc = ErrorAccumulator()
    acc.add(y, y_hat)
    return acc.rel


def _reduce_rank(w: torch.Tensor, gram: torch.Tensor, rank: int, weight_dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced-rank regression: the best rank-R ``U @ D`` in place of the full fit ``W``.

    w: ``[C_out, C_in]`` the (ridge) solution, gram: ``Σ = X_cᵀX_c [C_in, C_in]`` the centred
    Gram matrix of its input.  Minimising ``Σ‖y − U D x‖²`` over rank-R maps is the projection of
    the fitted values onto their R main directions: U = the top-R eigenvectors of ``W Σ Wᵀ``
    (the fitted values' scatter), ``D = Uᵀ W``.  Returns ``(U [C_out, R], D [R, C_in])`` rounded
    to ``weight_dtype`` (as stored) and back to float32, on ``w``'s device.  The eigenproblem is
    tiny: float64 on the CPU, like the ridge solves.
    """
    w64 = w.detach().to("cpu", torch.float64)
    scatter = w64 @ gram.detach().to("cpu", torch.float64) @ w64.T
    _evals, evecs = torch.linalg.eigh((scatter + scatter.T) / 2)  # ascending eigenvalues
    u = evecs[:, -rank:].flip(1)  # [C_out, R], largest first
    d = u.T @ w64
    return _round_weight(u, weight_dtype).to(w.device), _round_weight(d, weight_dtype).to(w.device)


def _lowrank_bias(u: torch.Tensor, d: torch.Tensor, x_mean: torch.Tensor, y_mean: torch.Tensor) -> torch.Tensor:
    """``ȳ − U (D x̄)`` float32 ``[C_out]``, from the rounded factors: the training residual of
    the predictor as stored has zero mean (the bias absorbs the rounding's mean shift too)."""
    return (y_mean - u.double() @ (d.double() @ x_mean.to(u.device))).float()


def _fit_layer(ch: _Chain, k: torch.Tensor, v: torch.Tensor, k_mean: torch.Tensor, v_mean: torch.Tensor,
               n_train: int, reg: float, weight_dtype: torch.dtype, k_blocks, v_blocks,
               ranks: tuple[int, int] | None, value_input: ValueInput, timings: dict[str, float]
               ) -> tuple[_Stats, _Stats, float, float]:
    """One layer l >= 1 of one chain: returns ``(k̂_l, v̂_l, key pred relMSE, value pred relMSE)``.

    k, v: ``[N, C]`` this layer's keys and values (training rows first), k_mean/v_mean their
    training means.  Normal equations from centred moments; the Gram matrices of k̂_{l-1} and
    v̂_{l-1} come from the previous layer, so a layer computes five ``[C, C]`` products over the
    training rows (k̂_{l-1}ᵀk, k̂_lᵀk̂_l, k̂_lᵀv̂_{l-1}, k̂_lᵀv, v̂_{l-1}ᵀv) plus v̂_l's Gram matrix.
    ranks ``(R_k, R_v)``: low-rank predictors, reduced from the ridge solutions; the chain then
    predicts with the rounded factors in the format's order (reference.semantics), as inference does.
    value_input "k_prev": the value predictor's second input (``vp`` below) is k̂_{l-1}.
    """
    c = k.shape[1]
    kp = ch.k_prev
    vp = kp if value_input == "k_prev" else ch.v_prev
    t0 = time.perf_counter()
    (sxy,) = _centred_products([(kp.xc, k[:n_train])])
    a_w, a_b = solve_ridge(kp.gram, sxy, kp.mean, k_mean, reg, k_blocks)
    if ranks:
        u_k, d_k = _reduce_rank(a_w, kp.gram, ranks[0], weight_dtype)
        a_b = _lowrank_bias(u_k, d_k, kp.mean, k_mean)

        def predict_k(sl: slice) -> torch.Tensor:
            return predict_keys_lowrank(kp.x[sl], d_k, u_k, a_b)  # p = U_k (D_k k̂_{l-1}) + a
    else:
        a_w = _round_weight(a_w, weight_dtype)
        a_wt = a_w.T.contiguous()

        def predict_k(sl: slice) -> torch.Tensor:
            return torch.addmm(a_b, kp.x[sl], a_wt)  # p = A k̂_{l-1} + a
    timings["fit"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    # k̂ = p + Q(k − p)
    k_hat, kh_mean, k_pred_err = _predict_quantize(ch.qk, k, predict_k, n_train, n_train)
    timings["quantize"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    kh = _Stats(k_hat, n_train, kh_mean)
    g_kv, s_k, s_v = _centred_products([(kh.xc, vp.xc), (kh.xc, v[:n_train]), (vp.xc, v[:n_train])])
    gram = torch.cat([torch.cat([kh.gram, g_kv], 1), torch.cat([g_kv.T, vp.gram], 1)], 0)  # [2C, 2C]
    x_mean = torch.cat([kh.mean, vp.mean])
    b_w, b_b = solve_ridge(gram, torch.cat([s_k, s_v], 0), x_mean, v_mean, reg, v_blocks)
    if ranks:
        u_v, d_v = _reduce_rank(b_w, gram, ranks[1], weight_dtype)  # d_v: [R_v, 2C] = [D_vk, D_vv]
        d_vk, d_vv = d_v[:, :c].contiguous(), d_v[:, c:].contiguous()
        b_b = _lowrank_bias(u_v, d_v, x_mean, v_mean)

        def predict_v(sl: slice) -> torch.Tensor:
            return predict_values_lowrank(k_hat[sl], vp.x[sl], d_vk, d_vv, u_v, b_b)
    else:
        b_k, b_v = _round_weight(b_w[:, :c], weight_dtype), _round_weight(b_w[:, c:], weight_dtype)
        b_kt, b_vt = b_k.T.contiguous(), b_v.T.contiguous()

        def predict_v(sl: slice) -> torch.Tensor:
            return torch.addmm(b_b, k_hat[sl], b_kt).addmm_(vp.x[sl], b_vt)  # q = B_K k̂_l + B_V v̂_{l-1} + b
    timings["fit"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    v_hat, vh_mean, v_pred_err = _predict_quantize(ch.q, v, predict_v, n_train, n_train)
    timings["quantize"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    vh = _Stats(v_hat, n_train, vh_mean, moments=value_input != "k_prev")
    timings["fit"] += time.perf_counter() - t0

    def np32(t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float32).numpy().copy()

    if ranks:
        factors = LowRankFactors(k_down=np32(d_k), k_up=np32(u_k), v_down_k=np32(d_vk), v_down_v=np32(d_vv),
                                 v_up=np32(u_v))
        ch.predictors.append(LayerPredictor.from_factors(factors, k_bias=np32(a_b), v_bias=np32(b_b)))
    else:
        ch.predictors.append(LayerPredictor(k_weight=np32(a_w), k_bias=np32(a_b), v_weight_k=np32(b_k),
                                            v_weight_v=np32(b_v), v_bias=np32(b_b)))
    return kh, vh, k_pred_err, v_pred_err


def reports_as_dicts(reports: list[LayerReport]) -> list[dict[str, float]]:
    return [asdict(r) for r in reports]
