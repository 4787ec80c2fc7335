"""Synthetic llama-architecture GGUFs with random weights, written straight from shapes.

For speed and memory benchmarks (bench/bench_gpu_cache.py): a Llama-3.2-1B- or Llama-3.1-8B-shaped
model needs no checkpoint, no hub and no transformers detour.  Quantized weights are random
Q4_0 / Q8_0 blocks (random codes from a repeated random pool, one scale chosen for a weight std of about 0.02), norms are
ones, and the vocabulary is a synthetic SentencePiece-style list (control, byte and filler
tokens) that llama.cpp loads like a real one.  Optional AQUA-KV predictors of the right shapes
(random, small enough that the layer chain stays bounded) make a model.aqua.gguf: dense,
per-head block-diagonal or low-rank (``synthetic_aquakv_params``).

The outputs are meaningless text; only the shapes, types and therefore the costs are real.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from tqdm import tqdm

from aquakv_gguf.gguf_io import AquaKVParams
from aquakv_gguf.gguf_io.writer import check_params, aquakv_metadata, aquakv_tensors
from aquakv_gguf.testing.aqua_params import random_aquakv_params

log = logging.getLogger(__name__)

_WEIGHT_STD = 0.02
# bytes per 32-value block and the spread of a uniformly random code, per weight type
_BLOCK = {"q4_0": (18, GGMLQuantizationType.Q4_0, 4.61, 2), "q8_0": (34, GGMLQuantizationType.Q8_0, 73.6, 7)}


@dataclass(frozen=True)
class LlamaShape:
    """Hyper-parameters of a llama-architecture model (ne conventions of llama.cpp)."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    tied_embeddings: bool
    rope_freq_base: float = 500000.0
    n_ctx_train: int = 131072

    @property
    def n_kv_channels(self) -> int:
        return self.n_head_kv * self.head_dim


SHAPES: dict[str, LlamaShape] = {
    "1b": LlamaShape("llama-3.2-1b-shape", 16, 2048, 32, 8, 64, 8192, 128256, tied_embeddings=True),
    "8b": LlamaShape("llama-3.1-8b-shape", 32, 4096, 32, 8, 128, 14336, 128256, tied_embeddings=False),
    # small enough for a CPU test
    "tiny": LlamaShape("tiny-shape", 2, 256, 4, 2, 64, 512, 1024, tied_embeddings=False, n_ctx_train=4096),
}


def synthetic_aquakv_params(shape: LlamaShape, *, n_points: int = 16, block_size: int = 0, rank_k: int = 0,
                            rank_v: int = 0, seed: int = 1) -> AquaKVParams:
    """Random AQUA-KV predictors for ``shape`` (aqua_params.random_aquakv_params) at a bounded scale.

    Dense weights get entries of N(0, (0.3/sqrt(C))^2): spectral norm ~0.6, so the chain over layers
    stays bounded.  Block-diagonal ones (``block_size`` N) keep only C/N of each row's entries, so
    their entries are sqrt(C/N) larger for the same norm.  Low-rank ones (``rank_k`` R_k,
    ``rank_v`` R_v) get down-factors D at the dense scale and up-factors U of about unit columns
    (N(0, 1/C)): ‖U·D‖ <= ‖U‖·‖D‖ ~ 0.3·(1 + sqrt(R/C))^2, below the dense ~0.6 for R <= C/6
    (8B shape, C = 1024: keys at rank 32 0.37, values at rank 64 0.55 over both inputs).
    """
    c = shape.n_kv_channels
    scale = 0.3 / float(np.sqrt(c))
    if block_size:
        scale *= float(np.sqrt(c / block_size))
    return random_aquakv_params(shape.n_layer, shape.n_head_kv, shape.head_dim, seed=seed, n_points=n_points,
                                scale=scale, block_size=block_size, rank_k=rank_k, rank_v=rank_v)


_POOL_BYTES = 1 << 24


def _random_blocks(rng: np.random.Generator, pool: np.ndarray, rows: int, cols: int, wtype: str) -> np.ndarray:
    """``[rows, cols/32 * block_bytes]`` uint8: random quantized blocks with a fixed f16 scale.

    The codes are a random slice of ``pool`` repeated: generating gigabytes of fresh random bytes
    for an 8B shape would dominate a benchmark call, and the costs do not depend on the values.
    """
    block_bytes, _, code_std, _ = _BLOCK[wtype]
    if cols % 32:
        raise ValueError(f"a quantized row needs a multiple of 32 values, got {cols}")
    n_blocks = cols // 32
    n = rows * n_blocks * block_bytes
    start = int(rng.integers(0, pool.size))
    data = np.resize(np.concatenate([pool[start:], pool[:start]]), n).reshape(rows, n_blocks, block_bytes)
    scale = np.frombuffer(np.float16(_WEIGHT_STD / code_std).tobytes(), dtype=np.uint8)
    data[:, :, 0:2] = scale
    return data.reshape(rows, n_blocks * block_bytes)


def _vocab(n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and types of a SentencePiece-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, fillers."""
    if n_vocab < 259 + 1:
        raise ValueError(f"the synthetic vocabulary needs at least 260 tokens, got {n_vocab}")
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    tokens += [f"\u2581t{i}".encode() for i in range(n_vocab - len(tokens))]
    types += [TokenType.NORMAL] * (n_vocab - len(types))
    scores = [0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(n_vocab - 259)]
    return tokens, scores, [int(t) for t in types]


def write_synthetic_llama(path: str | os.PathLike[str], shape: LlamaShape, *, weights: str = "q4_0",
                          aquakv: AquaKVParams | None = None, seed: int = 0, progress: bool = True) -> Path:
    """Write a llama-architecture GGUF of ``shape`` with random ``weights`` (q4_0 or q8_0) blocks.

    ``aquakv`` (llama.cpp channel order, dims matching ``shape``; any predictor form: dense,
    block-diagonal, low-rank) adds the AQUA-KV tensors and metadata, exactly as the converter
    writes them (aquakv_gguf.gguf_io.writer).  Written to a temporary file, then renamed.
    """
    if weights not in _BLOCK:
        raise ValueError(f"weights must be one of {sorted(_BLOCK)}, got {weights!r}")
    if aquakv is not None:
        check_params(aquakv)
        dims = (aquakv.n_layers, aquakv.n_kv_heads, aquakv.head_dim)
        if dims != (shape.n_layer, shape.n_head_kv, shape.head_dim):
            raise ValueError(f"AQUA-KV params for (layers, kv heads, head dim) {dims} do not match "
                             f"{shape.name}: {(shape.n_layer, shape.n_head_kv, shape.head_dim)}")
    t0 = time.perf_counter()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, size=_POOL_BYTES, dtype=np.uint8)
    _, qtype, _, file_type = _BLOCK[weights]
    arch = "llama"
    w = GGUFWriter(str(tmp), arch)
    w.add_name(shape.name)
    w.add_file_type(file_type)
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(shape.rope_freq_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(shape.n_vocab)
    tokens, scores, types = _vocab(shape.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if aquakv is not None:
        for key, value, vtype, sub_type in aquakv_metadata(aquakv):
            if sub_type is None:
                w.add_key_value(key, value, vtype)
            else:
                w.add_key_value(key, value, vtype, sub_type=sub_type)

    def quant(name: str, rows: int, cols: int) -> None:
        # numpy shape [rows, bytes]: gguf-py derives ne = [cols, rows] from the block type
        w.add_tensor(name, _random_blocks(rng, pool, rows, cols, weights), raw_dtype=qtype)

    def ones(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    e, c, ff = shape.n_embd, shape.n_kv_channels, shape.n_ff
    quant("token_embd.weight", shape.n_vocab, e)
    ones("output_norm.weight", e)
    if not shape.tied_embeddings:
        quant("output.weight", shape.n_vocab, e)
    for il in tqdm(range(shape.n_layer), desc=f"random {weights} layers of {shape.name}", disable=not progress):
        ones(f"blk.{il}.attn_norm.weight", e)
        quant(f"blk.{il}.attn_q.weight", shape.n_head * shape.head_dim, e)
        quant(f"blk.{il}.attn_k.weight", c, e)
        quant(f"blk.{il}.attn_v.weight", c, e)
        quant(f"blk.{il}.attn_output.weight", e, shape.n_head * shape.head_dim)
        ones(f"blk.{il}.ffn_norm.weight", e)
        quant(f"blk.{il}.ffn_gate.weight", ff, e)
        quant(f"blk.{il}.ffn_up.weight", ff, e)
        quant(f"blk.{il}.ffn_down.weight", e, ff)
    if aquakv is not None:
        for name, arr in aquakv_tensors(aquakv).items():
            w.add_tensor(name, arr)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.info("wrote %s (%.2f GiB) in %.1f s", path, path.stat().st_size / 2**30, time.perf_counter() - t0)
    return path
