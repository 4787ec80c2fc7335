"""``python -m aquakv_gguf.convert MODEL --out model.aqua.gguf``: calibrate AQUA-KV and write the GGUF.

MODEL is a GGUF file (calibrated on its weights as transformers' GGUF loader dequantizes them;
the file is copied unchanged) or a Hugging Face folder (converted first with the pinned
llama.cpp's ``convert_hf_to_gguf.py``; calibrated on the Hugging Face weights).  Both paths
calibrate in Hugging Face channel order (transformers' GGUF loader undoes llama.cpp's Q/K row
permutation), and the predictors are permuted into llama.cpp's order before writing.

Bad input ends with one ``error: ...`` line and exit code 2, and never leaves a partial output.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from aquakv_gguf.calibrate import (
    CalibrationError,
    CalibrationResult,
    Recipe,
    UnsupportedModelError,
    calibrate,
    check_full_attention,
    make_sequences,
    recipe_for_gguf_arch,
    recipe_for_hf_config,
)
from aquakv_gguf.calibrate.chain import (
    GRID_DIM,
    LAYER0_BITS,
    LayerReport,
    check_predictor_block,
)
from aquakv_gguf.calibrate.quantizer import bits_to_points
from aquakv_gguf.gguf_io import (
    AquaKVFormatError,
    AquaKVParams,
    ModelDims,
    check_predictor_form,
    check_value_input,
    open_gguf,
    read_aqua_gguf,
    read_model_dims,
    write_aqua_gguf,
)
from aquakv_gguf.reference.accounting import bits_per_value

log = logging.getLogger("aquakv_gguf.convert")

CONTEXTS = (8192, 32768)


class ConvertError(ValueError):
    """The conversion cannot proceed; the message is one line."""


@dataclass
class ConvertSummary:
    """What the converter did; ``bits_per_value[n]`` at context n, predictor size in MiB."""

    out: Path
    recipe: str
    params: AquaKVParams  # as written (llama.cpp channel order)
    params_hf: AquaKVParams  # as fitted (Hugging Face channel order)
    bits: int
    group_size: int
    calib_tokens: int
    reports: list[LayerReport]
    bits_per_value: dict[int, float]
    predictor_mib: float
    seconds: float
    peak_rss_mib: float
    peak_rss_children_mib: float
    timings: dict[str, float] = field(default_factory=dict)
    others: dict[int, tuple[Path, list[LayerReport]]] = field(default_factory=dict)  # --also outputs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _check_output(model: Path, out: Path, force: bool) -> None:
    """Fail early (before minutes of calibration) on an output we may not or cannot write."""
    if out.exists() and out.is_dir():
        raise ConvertError(f"output {out} is a folder")
    if model.exists() and (out.resolve() == model.resolve() or (out.exists() and os.path.samefile(out, model))):
        raise ConvertError(f"refusing to overwrite the input model {model}")
    if out.exists() and not force:
        raise ConvertError(f"output {out} exists (use --force to overwrite it)")
    parent = out.parent
    if not parent.is_dir():
        raise ConvertError(f"output folder {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{out.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConvertError(f"cannot write to output folder {parent} ({exc.strerror or exc})") from exc


def _model_kind(model: Path) -> str:
    if model.is_dir():
        if not (model / "config.json").is_file():
            raise ConvertError(f"{model} is a folder without config.json (not a Hugging Face model)")
        return "hf"
    if model.is_file():
        with open(model, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise ConvertError(f"{model} is neither a GGUF file nor a Hugging Face folder")
    raise ConvertError(f"{model}: no such file or folder")


def _read_text(calib_text: Path | None) -> tuple[str, str]:
    """(text, description of its source)."""
    if calib_text is None:
        from aquakv_gguf.assets import calibration_text

        return calibration_text(), "janeaustenr: Emma, Mansfield Park, Northanger Abbey, Persuasion, Sense and Sensibility"
    try:
        return calib_text.read_text(encoding="utf-8"), calib_text.name
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvertError(f"cannot read calibration text {calib_text} ({_first_line(exc)})") from exc


def _model_dims_from_config(config: Any) -> tuple[int, int, int]:
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return int(config.num_hidden_layers), int(config.num_key_value_heads), head_dim


def _check_dims(dims: ModelDims, config: Any, what: str) -> None:
    got = _model_dims_from_config(config)
    want = (dims.n_layers, dims.n_kv_heads, dims.head_dim)
    if got != want:
        raise ConvertError(f"{what}: GGUF metadata says {want[0]} layers x {want[1]} KV heads x {want[2]}, "
                           f"the loaded model has {got[0]} x {got[1]} x {got[2]}")


def _load_hf_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many types; the user needs the message
        raise ConvertError(f"transformers could not load the tokenizer of {folder}: {_first_line(exc)}") from exc


def _load_hf_model(folder: Path, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except Exception as exc:
        raise ConvertError(f"transformers could not load {folder}: {_first_line(exc)}") from exc
    return model.to(device).eval()


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within this block, transformers parses a GGUF's metadata once instead of three times.

    Loading a GGUF tokenizer and model calls transformers' ``load_gguf_checkpoint`` three times
    (tokenizer config, model config, weights), each building a ``gguf.GGUFReader`` that parses
    the whole vocabulary field by field, and rebuilds ``gguf.get_tensor_name_map`` once per
    module (~400 times): about 25 of the ~40 s that SmolLM2 takes to load on two cores.  The
    metadata-only calls share one result (deep-copied: callers edit it), readers are shared per
    path (read-only memory maps) and the name map is cached.  If a transformers version imports
    these names differently, the patches simply do not apply: loading stays correct, only slower.
    """
    import gguf
    import transformers.modeling_gguf_pytorch_utils as tgguf

    orig_reader, orig_name_map, orig_load = gguf.GGUFReader, gguf.get_tensor_name_map, tgguf.load_gguf_checkpoint
    readers: dict[tuple[str, str], Any] = {}
    metadata: dict[str, Any] = {}

    def shared_reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = orig_reader(path, mode)
        return readers[key]

    def load_once(gguf_checkpoint_path: Any, return_tensors: bool = False, *args: Any, **kwargs: Any) -> Any:
        if return_tensors or args or kwargs:
            return orig_load(gguf_checkpoint_path, return_tensors, *args, **kwargs)
        key = os.path.realpath(os.fspath(gguf_checkpoint_path))
        if key not in metadata:
            metadata[key] = orig_load(gguf_checkpoint_path, return_tensors=False)
        return copy.deepcopy(metadata[key])

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(orig_name_map)
    tgguf.load_gguf_checkpoint = load_once
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map, tgguf.load_gguf_checkpoint = orig_reader, orig_name_map, orig_load
        readers.clear()


def _load_gguf(path: Path, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _gguf_parsed_once():
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:
        raise ConvertError(f"transformers could not load {path}: {_first_line(exc)}") from exc
    return model.to(device).eval(), tok


def _inspect_gguf(path: Path) -> tuple[ModelDims, Recipe]:
    reader = open_gguf(path)
    if any(k.startswith("aquakv.") for k in reader.fields):
        raise ConvertError(f"{path} already carries aquakv.* data: convert the original model")
    arch = reader.get("general.architecture")
    if not isinstance(arch, str):
        raise ConvertError(f"{path}: no general.architecture key")
    recipe = recipe_for_gguf_arch(arch)
    dims = read_model_dims(reader, path)
    if dims.sliding_window > 0:
        raise UnsupportedModelError(f"{path}: sliding-window attention ({dims.arch}.attention.sliding_window="
                                    f"{dims.sliding_window}) is not supported by AQUA-KV")
    return dims, recipe


def _resolve_group_size(group_size: int | None, c: int, head_dim: int) -> int:
    from aquakv_gguf import quant

    if group_size is None:
        return int(quant.choose_group_size(c, head_dim))
    if group_size < GRID_DIM or group_size & (group_size - 1) or c % group_size:
        raise ConvertError(f"--group-size {group_size} must be a power of two >= {GRID_DIM} dividing C = {c}")
    return group_size


def summary_bits_per_value(params: AquaKVParams, n_tokens: int) -> float:
    return bits_per_value(n_tokens, n_layers=params.n_layers, n_channels=params.n_channels,
                          group_size=params.group_size, n_points=params.grid.shape[0],
                          n_points0=params.grid0.shape[0], prefix_tokens=params.prefix_tokens,
                          recent_tokens=params.recent_tokens)


# The converter's predictor form when none is asked for: the fastest form measured to meet the
# quality bar (SmolLM2, docs/PERF.md C8: with k_prev values mean KLD 0.27x q4_0's, PPL +0.90%; dense
# 0.20x / +0.49% decodes several times slower on the CPU). Ranks above a model's C are clamped to C.
DEFAULT_PREDICTOR = "lowrank:32,64"
# ... and its value input: "k_prev" removes the value chain, so the CPU cache folds the value
# predictor onto the attention output (no value product per cell when decoding)
DEFAULT_VALUE_INPUT = "k_prev"


def default_predictor(n_channels: int) -> tuple[str, int, int]:
    """``(form, rank_k, rank_v)`` of DEFAULT_PREDICTOR for a model with ``n_channels`` KV channels."""
    form, rank_k, rank_v = parse_predictor(DEFAULT_PREDICTOR)
    return form, min(rank_k, n_channels), min(rank_v, n_channels)


def parse_predictor(text: str) -> tuple[str, int, int]:
    """``--predictor`` value -> ``(form, rank_k, rank_v)``: "dense", "lowrank:R" (both ranks R) or "lowrank:RK,RV"."""
    form, sep, ranks = text.strip().partition(":")
    if form == "dense" and not sep:
        return "dense", 0, 0
    parts = ranks.split(",")
    if form == "lowrank" and sep and 1 <= len(parts) <= 2 and all(p.strip().isdigit() for p in parts):
        rank_k, rank_v = int(parts[0]), int(parts[-1])
        return "lowrank", rank_k, rank_v
    raise ConvertError(f"--predictor expects dense, lowrank:R or lowrank:RK,RV, got {text!r}")


def convert(model: str | os.PathLike[str], out: str | os.PathLike[str], *, bits: int = 2,
            group_size: int | None = None, calib_tokens: int | None = None, calib_text: str | os.PathLike[str] | None = None,
            calib_seq_len: int | None = None, seed: int = 0, device: str = "cpu", force: bool = False,
            outtype: str = "f16", also: dict[int, str | os.PathLike[str]] | None = None,
            prefix_tokens: int = 4, recent_tokens: int = 128, predictor_block: int | None = None,
            predictor_form: str | None = None, rank_k: int = 0, rank_v: int = 0, value_input: str | None = None,
            progress: bool = True) -> ConvertSummary:
    """Calibrate ``model`` and write ``out``; raises ConvertError/CalibrationError/AquaKVFormatError.

    ``also`` maps further bit widths to further outputs: they share the (slow) pass over the
    model, each with its own chain of reconstructions and predictors.  ``predictor_block`` N
    fits block-diagonal predictors with ``[N, N]`` blocks (typically N = head_dim: one block
    per KV head); None is dense.  ``predictor_form="lowrank"`` with ``rank_k``/``rank_v``
    (1..C) fits low-rank predictors (not combinable with ``predictor_block``); None is
    DEFAULT_PREDICTOR, or dense when ``predictor_block`` is given.  ``value_input`` "k_prev"
    predicts values from ``[k̂_l; k̂_{l-1}]`` instead of ``[k̂_l; v̂_{l-1}]`` (no value chain; the
    cache then folds the value predictor onto the attention output); None is
    DEFAULT_VALUE_INPUT for low-rank forms and "v_prev" (the paper's chain) for dense ones.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    model, out = Path(model), Path(out)
    if bits in (also or {}):
        raise ConvertError(f"--also repeats the main bit width {bits}")
    outputs = {bits: out, **{int(b): Path(p) for b, p in (also or {}).items()}}
    for b in outputs:
        if b not in (2, 3, 4):
            raise ConvertError(f"--bits must be 2, 3 or 4, got {b}")
    if len({p.resolve() for p in outputs.values()}) != len(outputs):
        raise ConvertError("every bit width needs its own output file")
    if prefix_tokens < 0 or recent_tokens < 1:
        raise ConvertError("--prefix-tokens must be >= 0 and --recent-tokens >= 1")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConvertError("--device cuda requested but torch sees no CUDA device")
    for path in outputs.values():
        _check_output(model, path, force)
    kind = _model_kind(model)
    text, text_source = _read_text(Path(calib_text) if calib_text is not None else None)
    if not text.strip():
        raise CalibrationError("calibration text is empty")

    with tempfile.TemporaryDirectory(prefix=".aquakv-convert-", dir=out.parent) as tmp:
        # Cheap checks (recipe, dimensions, group size, calibration text) come before the slow
        # steps (GGUF conversion, model loading, calibration) so bad input fails fast.
        t0 = time.perf_counter()
        if kind == "hf":
            from transformers import AutoConfig

            try:
                config = AutoConfig.from_pretrained(str(model))
            except Exception as exc:
                raise ConvertError(f"cannot read {model}/config.json: {_first_line(exc)}") from exc
            recipe = recipe_for_hf_config(config)
            n_layers, n_kv, head_dim = _model_dims_from_config(config)
            tokenizer = _load_hf_tokenizer(model)
        else:
            dims, recipe = _inspect_gguf(model)
            n_layers, n_kv, head_dim = dims.n_layers, dims.n_kv_heads, dims.head_dim
            tokenizer = None
        c = n_kv * head_dim
        group = _resolve_group_size(group_size, c, head_dim)
        try:
            block = check_predictor_block(predictor_block, n_kv, head_dim, recipe.llama_cpp_permutes_qk)
        except ValueError as exc:
            raise ConvertError(f"--predictor-block: {exc}") from exc
        if predictor_form is None:
            predictor_form, rank_k, rank_v = ("dense", 0, 0) if predictor_block is not None else default_predictor(c)
        if value_input is None:
            value_input = DEFAULT_VALUE_INPUT if predictor_form == "lowrank" else "v_prev"
        try:
            check_predictor_form(predictor_form, rank_k, rank_v, c, 0 if block == c else block)
            check_value_input(value_input)
        except ValueError as exc:
            raise ConvertError(f"--predictor: {exc}") from exc
        if kind == "gguf":
            hf_model, tokenizer = _load_gguf(model, device)
            if hf_model.config.model_type not in recipe.hf_model_types:
                raise ConvertError(f"{model}: GGUF architecture {dims.arch!r} (recipe {recipe.name}) loads as "
                                   f"transformers model_type {hf_model.config.model_type!r}")
            check_full_attention(hf_model.config)
            _check_dims(dims, hf_model.config, str(model))
            src_gguf = model
            timings["load"] = time.perf_counter() - t0

        seq_len = calib_seq_len or recipe.calib_seq_len
        t1 = time.perf_counter()
        seqs = make_sequences(tokenizer, text, n_tokens=calib_tokens or recipe.default_calib_tokens(c), seq_len=seq_len,
                              heldout_fraction=recipe.heldout_fraction, seed=seed, prefix_tokens=prefix_tokens,
                              min_train_tokens=2 * c + 1)
        timings["tokenize"] = time.perf_counter() - t1
        log.info("calibration: %d sequences x %d tokens (%d held out) from %s", seqs.input_ids.shape[0], seq_len,
                 int(seqs.heldout.sum()), text_source)

        if kind == "hf":
            t1 = time.perf_counter()
            from aquakv_gguf.gguf_io.hf_convert import convert_hf_to_gguf

            src_gguf = Path(tmp) / f"{model.name or 'model'}.gguf"
            log.info("converting %s to GGUF (%s) with the pinned convert_hf_to_gguf.py", model, outtype)
            try:
                convert_hf_to_gguf(model, src_gguf, outtype=outtype)
            except Exception as exc:
                log.info("convert_hf_to_gguf.py output:\n%s", exc)
                raise ConvertError(f"convert_hf_to_gguf.py failed on {model}: {_first_line(exc)}") from exc
            dims, _ = _inspect_gguf(src_gguf)
            if dims.arch != recipe.converts_to:
                raise ConvertError(f"{model}: convert_hf_to_gguf.py wrote architecture {dims.arch!r}, "
                                   f"recipe {recipe.name} expects {recipe.converts_to!r}")
            _check_dims(dims, config, str(model))
            timings["convert_hf_to_gguf"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            hf_model = _load_hf_model(model, device)
            _check_dims(dims, hf_model.config, str(model))
            timings["load"] = time.perf_counter() - t1
        log.info("loaded %s (%s recipe, %d layers, C = %d x %d)", model, recipe.name, n_layers, n_kv, head_dim)

        meta = {"text": text_source, "text_tokens": seqs.text_tokens, "tokens": seqs.n_tokens, "seed": int(seed),
                "recipe": recipe.name, "source_model": model.name}
        result: CalibrationResult = calibrate(
            hf_model, recipe, seqs.input_ids, seqs.heldout, bits=tuple(outputs), group_size=group, device=device,
            prefix_tokens=prefix_tokens, recent_tokens=recent_tokens, predictor_block=predictor_block,
            predictor_form=predictor_form, rank_k=rank_k, rank_v=rank_v, value_input=value_input,
            calibration_meta=meta, progress=progress)
        timings["calibrate"] = result.seconds
        for phase in ("capture", "fit", "quantize"):
            timings[f"calibrate.{phase}"] = result.timings[phase]
        del hf_model

        t1 = time.perf_counter()
        written = {}
        for b, path in outputs.items():
            written[b] = result.params[b].with_channel_order("llama.cpp", permutes_qk=recipe.llama_cpp_permutes_qk)
            write_aqua_gguf(src_gguf, path, written[b], progress=progress)
            try:
                read_aqua_gguf(path)
            except AquaKVFormatError:
                path.unlink(missing_ok=True)
                raise
        params = written[bits]
        timings["write"] = time.perf_counter() - t1

    usage_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return ConvertSummary(
        out=out, recipe=recipe.name, params=params, params_hf=result.params[bits], bits=bits, group_size=group, calib_tokens=seqs.n_tokens,
        reports=result.reports[bits], bits_per_value={n: summary_bits_per_value(params, n) for n in CONTEXTS},
        predictor_mib=params.predictor_bytes() / 2**20, seconds=time.perf_counter() - t_start,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        peak_rss_children_mib=usage_children, timings=timings,
        others={b: (outputs[b], result.reports[b]) for b in outputs if b != bits})


def describe_predictors(params: AquaKVParams) -> str:
    """The predictor form in words: "dense predictors", "block-diagonal predictors 64x64" or
    "low-rank predictors (keys rank 16, values rank 16)"."""
    block = params.predictor_block_size
    values = ", values from keys" if params.predictor_value_input == "k_prev" else ""
    if params.predictor_form == "lowrank":
        return (f"low-rank predictors (keys rank {params.predictor_rank_k}, values rank {params.predictor_rank_v}"
                f"{values})")
    return (f"block-diagonal predictors {block}x{block}" if block else "dense predictors") + (
        f" ({values[2:]})" if values else "")


def format_summary(s: ConvertSummary) -> str:
    """Human-readable summary: per-layer held-out relMSE, bits per value, predictor size, time, RAM."""
    lines = [(f"wrote {s.out}  (recipe {s.recipe}, {s.bits}-bit grid {bits_to_points(s.bits, GRID_DIM)} points, "
              f"layer 0 {LAYER0_BITS}-bit, group size {s.group_size}, {s.calib_tokens} calibration tokens, "
              f"{describe_predictors(s.params)})"),
             ("held-out relative MSE per layer (pred = predictor alone; k/v = AQUA-KV reconstruction; "
              "higgs = same bits without predictors):"),
             "  layer   k_pred   v_pred        k        v  k_higgs  v_higgs"]
    for r in s.reports:
        lines.append(f"  {r.layer:5d} {r.k_pred:8.4f} {r.v_pred:8.4f} {r.k:8.5f} {r.v:8.5f} {r.k_higgs:8.5f} {r.v_higgs:8.5f}")
    tail = s.reports[1:] or s.reports
    mean = lambda xs: sum(xs) / len(xs)
    lines.append(f"  mean(l>=1) {mean([r.k_pred for r in tail]):.4f} {mean([r.v_pred for r in tail]):.4f} "
                 f"{mean([r.k for r in tail]):.5f} {mean([r.v for r in tail]):.5f} "
                 f"{mean([r.k_higgs for r in tail]):.5f} {mean([r.v_higgs for r in tail]):.5f}")
    for b, (path, reports) in s.others.items():
        tail_b = reports[1:] or reports
        lines.append(f"also wrote {path} ({b}-bit): mean(l>=1) key pred {mean([r.k_pred for r in tail_b]):.4f}, "
                     f"value pred {mean([r.v_pred for r in tail_b]):.4f}, key recon {mean([r.k for r in tail_b]):.5f}, "
                     f"value recon {mean([r.v for r in tail_b]):.5f}")
    bpv = ", ".join(f"{v:.3f} at {n // 1024}K" for n, v in s.bits_per_value.items())
    lines.append(f"bits per value: {bpv} (codes + f16 scales + f16 sinks/recent window; layer 0 at {LAYER0_BITS} bits)")
    lines.append(f"predictors: {s.predictor_mib:.2f} MiB, {describe_predictors(s.params)} (f16 weights, f32 biases)")
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in s.timings.items())
    lines.append(f"wall time: {s.seconds:.1f} s ({phases})")
    lines.append(f"peak RAM: {s.peak_rss_mib:.0f} MiB (this process)"
                 + (f", {s.peak_rss_children_mib:.0f} MiB (largest child process)" if s.peak_rss_children_mib else ""))
    return "\n".join(lines)


def summary_dict(s: ConvertSummary) -> dict[str, Any]:
    """JSON-friendly summary (paths as strings, per-layer reports as dicts)."""
    return {
        "out": str(s.out), "recipe": s.recipe, "bits": s.bits, "group_size": s.group_size,
        "calib_tokens": s.calib_tokens, "bits_per_value": {str(k): v for k, v in s.bits_per_value.items()},
        "predictor_mib": s.predictor_mib, "predictor_block_size": s.params.predictor_block_size,
        "predictor_form": s.params.predictor_form, "predictor_rank_k": s.params.predictor_rank_k,
        "predictor_rank_v": s.params.predictor_rank_v, "predictor_value_input": s.params.predictor_value_input,
        "seconds": s.seconds, "peak_rss_mib": s.peak_rss_mib,
        "timings": s.timings, "reports": {str(s.bits): [asdict(r) for r in s.reports],
                                          **{str(b): [asdict(r) for r in reps] for b, (_p, reps) in s.others.items()}},
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m aquakv_gguf.convert",
                                 description="Calibrate AQUA-KV predictors for a model and write model.aqua.gguf.")
    ap.add_argument("model", type=Path, help="a GGUF file or a Hugging Face model folder")
    ap.add_argument("--out", type=Path, required=True, help="output GGUF (written via a temporary file)")
    ap.add_argument("--bits", type=int, choices=(2, 3, 4), default=2, help="bits per value for layers >= 1 (default 2)")
    ap.add_argument("--group-size", type=int, default=None, help="channels per HIGGS group (default: C or the "
                    "largest power of two dividing C, at least head_dim)")
    ap.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens (default: the recipe's: 131072, or 256 per KV channel when "
                    "that is more; docs/CONVERT_SPEED.md)")
    ap.add_argument("--calib-seq-len", type=int, default=None, help="tokens per calibration sequence (default: the recipe's)")
    ap.add_argument("--calib-text", type=Path, default=None, help="UTF-8 text file (default: five Austen novels)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for torch (default: torch's choice; 1 is faster on a machine busy with other jobs)")
    ap.add_argument("--prefix-tokens", type=int, default=4, help="attention-sink tokens kept in f16 (default 4)")
    ap.add_argument("--recent-tokens", type=int, default=128,
                    help="tokens gathered in f16 before a chunk is quantized (default 128)")
    ap.add_argument("--predictor-block", type=int, default=None, metavar="N",
                    help="block-diagonal predictors with N x N blocks (N divides C; a multiple of head_dim when "
                         "llama.cpp permutes key channels; typically head_dim: one block per KV head). "
                         "Default: dense")
    ap.add_argument("--predictor", default=None, metavar="FORM",
                    help="predictor form: dense (best quality, slowest decode), lowrank:R (keys and values "
                         "rank R) or lowrank:RK,RV (1 <= R <= C; not with --predictor-block). "
                         f"Default: {DEFAULT_PREDICTOR} (ranks clamped to C), dense with --predictor-block")
    ap.add_argument("--value-input", default=None, choices=("v_prev", "k_prev"),
                    help="the value predictor's second input: v_prev = the previous layer's values (the paper's "
                         "chain), k_prev = its keys (no value chain: the cache applies the value predictor to the "
                         f"attention output instead of every cell). Default: {DEFAULT_VALUE_INPUT} with low-rank "
                         "forms, v_prev with dense")
    ap.add_argument("--outtype", default="f16", help="weight type when converting a Hugging Face folder (default f16)")
    ap.add_argument("--also", action="append", default=[], metavar="BITS:PATH",
                    help="also write the predictors fitted for BITS to PATH, sharing the pass over the model "
                         "(repeatable)")
    ap.add_argument("--summary-json", type=Path, default=None, help="also write the summary as JSON to this file")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output (never the input)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from aquakv_gguf.assets import AssetError

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    also = {}
    for item in args.also:
        b, sep, path = item.partition(":")
        if not sep or not b.isdigit() or not path:
            print(f"error: --also expects BITS:PATH, got {item!r}", file=sys.stderr)
            return 2
        also[int(b)] = Path(path)
    try:
        predictor_form, rank_k, rank_v = parse_predictor(args.predictor) if args.predictor else (None, 0, 0)
        summary = convert(args.model, args.out, bits=args.bits, group_size=args.group_size,
                          calib_tokens=args.calib_tokens, calib_text=args.calib_text, calib_seq_len=args.calib_seq_len,
                          seed=args.seed, device=args.device, force=args.force, outtype=args.outtype,
                          also=also, prefix_tokens=args.prefix_tokens, recent_tokens=args.recent_tokens,
                          predictor_block=args.predictor_block, predictor_form=predictor_form, rank_k=rank_k,
                          rank_v=rank_v, value_input=args.value_input, progress=not args.quiet)
    except (ConvertError, CalibrationError, AquaKVFormatError, AssetError) as exc:
        print(f"error: {_first_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(format_summary(summary))
    if args.summary_json is not None:
        args.summary_json.write_text(json.dumps(summary_dict(summary), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
