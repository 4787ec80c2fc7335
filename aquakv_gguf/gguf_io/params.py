"""AQUA-KV parameters (grids, group size, token policy, chained predictors) as plain numpy.

One object travels between calibration (produces it, Hugging Face channel order), the
GGUF writer/reader (llama.cpp channel order on disk) and the torch reference cache
(Hugging Face channel order).  Orientation is fixed everywhere: a predictor weight is a
numpy array ``[C_out, C_in]`` used as ``p = W @ x + b`` for one token's channel vector
``x: [C_in]`` (row-vector form for many tokens: ``p = x @ W.T + b``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

ChannelOrder = Literal["hf", "llama.cpp"]


@dataclass
class LayerPredictor:
    """Predictors of one layer l >= 1 (DESIGN §3).

    k_weight: A_l ``[C, C]``; k_bias: a_l ``[C]``: key prediction ``p = A_l @ k_hat_prev + a_l``.
    v_weight_k: B_K ``[C, C]`` (input: this layer's k_hat), v_weight_v: B_V ``[C, C]`` (input:
    the previous layer's v_hat), v_bias: b_l ``[C]``: ``q = B_K @ k_hat + B_V @ v_hat_prev + b_l``.
    """

    k_weight: np.ndarray
    k_bias: np.ndarray
    v_weight_k: np.ndarray
    v_weight_v: np.ndarray
    v_bias: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def map(self, fn) -> LayerPredictor:
        """A copy with ``fn(name, array)`` applied to every array."""
        return LayerPredictor(**{k: fn(k, v) for k, v in self.arrays().items()})


@dataclass
class AquaKVParams:
    """Everything the AQUA-KV cache needs besides the model.

    grid: ``[n_points, dim]`` f32 codebook of layers >= 1; grid0: ``[n_points0, dim]`` of layer 0.
    predictors[l] is None for l = 0 and a LayerPredictor for every l >= 1.
    channel_order says whether key channels follow Hugging Face (rotate_half pairs) or llama.cpp
    (rows permuted by convert_hf_to_gguf.py for Llama-family models).
    calibration: free-form provenance (text source, tokens, seed, per-layer held-out relMSE).
    predictor_block_size: 0 for dense predictor weights; else N dividing C: every weight is
    block-diagonal with ``C/N`` blocks ``[N, N]`` (zeros elsewhere, still stored ``[C, C]``), which
    lets the cache multiply by the blocks alone (C/N times fewer FLOPs).
    """

    grid: np.ndarray
    grid0: np.ndarray
    group_size: int
    prefix_tokens: int
    recent_tokens: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    predictors: list[LayerPredictor | None]
    channel_order: ChannelOrder = "hf"
    calibration: dict[str, Any] = field(default_factory=dict)
    predictor_block_size: int = 0

    @property
    def n_channels(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def bits(self) -> float:
        """Bits per value of the grid of layers >= 1 (``log2(n_points) / dim``)."""
        return float(np.log2(self.grid.shape[0]) / self.grid.shape[1])

    @property
    def bits0(self) -> float:
        return float(np.log2(self.grid0.shape[0]) / self.grid0.shape[1])

    @property
    def block_size(self) -> int:
        """Predictor block size N (C when dense)."""
        return self.predictor_block_size or self.n_channels

    def predictor_bytes(self, weight_bytes: int = 2, bias_bytes: int = 4) -> int:
        """Stored size of all predictors (f16 weights and f32 biases by default)."""
        c = self.n_channels
        per_layer = 3 * c * c * weight_bytes + 2 * c * bias_bytes
        return per_layer * sum(p is not None for p in self.predictors)

    def with_channel_order(self, order: ChannelOrder, *, permutes_qk: bool) -> AquaKVParams:
        """The same parameters in another key-channel order.

        ``permutes_qk`` is the recipe's ``llama_cpp_permutes_qk``: when False both orders coincide.
        With P the permutation matrix of llama_cpp_key_permutation (``k_llama = P @ k_hf``):
        A' = P A Pᵀ, a' = P a, B_K' = B_K Pᵀ; value channels are never permuted.
        """
        if order == self.channel_order:
            return self
        new = dataclasses.replace(self, channel_order=order, predictors=list(self.predictors))
        if not permutes_qk:
            return new
        perm = llama_cpp_key_permutation(self.n_kv_heads, self.head_dim)
        if order == "hf":
            perm = np.argsort(perm)
        new.predictors = [None if p is None else permute_predictor(p, perm) for p in self.predictors]
        return new


def llama_cpp_key_permutation(n_kv_heads: int, head_dim: int) -> np.ndarray:
    """Index array ``perm: [C]`` with ``k_llama_cpp = k_hf[perm]``.

    convert_hf_to_gguf.py's ``LlamaModel.permute`` reshapes each head's rows as
    ``[2, head_dim/2]`` and swaps the axes, so llama.cpp row ``h*D + 2*i + j`` is Hugging Face
    row ``h*D + j*D/2 + i``: the two rotate_half halves become adjacent pairs.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    rows = np.arange(n_kv_heads * head_dim).reshape(n_kv_heads, 2, head_dim // 2)
    return rows.swapaxes(1, 2).reshape(-1)


def permute_predictor(pred: LayerPredictor, perm: np.ndarray) -> LayerPredictor:
    """Apply the key-channel permutation ``perm`` (new[i] = old[perm[i]]) to one layer's predictors.

    Key channels are the output and input of A (rows and columns), the output of a, and the
    input (columns) of B_K.  B_V, b and every value channel stay as they are.
    """
    return LayerPredictor(
        k_weight=pred.k_weight[np.ix_(perm, perm)].copy(),
        k_bias=pred.k_bias[perm].copy(),
        v_weight_k=pred.v_weight_k[:, perm].copy(),
        v_weight_v=pred.v_weight_v.copy(),
        v_bias=pred.v_bias.copy(),
    )


def off_block_max(w: np.ndarray, block: int) -> float:
    """Largest |entry| of ``w: [C, C]`` outside its diagonal ``[block, block]`` blocks (0.0 when dense)."""
    c = w.shape[0]
    if block >= c:
        return 0.0
    nb = c // block
    blocks = np.abs(w).reshape(nb, block, nb, block)
    off = blocks.copy()
    off[np.arange(nb), :, np.arange(nb), :] = 0
    return float(off.max(initial=0.0))
