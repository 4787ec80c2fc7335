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

from . import names

ChannelOrder = Literal["hf", "llama.cpp"]
PredictorForm = Literal["dense", "lowrank"]
# the value predictor's second input: the previous layer's values (the paper's chain) or keys
ValueInput = Literal["v_prev", "k_prev"]


@dataclass
class LowRankFactors:
    """Low-rank factors of one layer's predictors (form "lowrank"), numpy ``[C_out, C_in]`` orientation.

    k_down: D_k ``[R_k, C]``, k_up: U_k ``[C, R_k]``: keys ``p = U_k @ (D_k @ k_hat_prev) + a``.
    v_down_k: D_vk ``[R_v, C]`` (input: this layer's k_hat), v_down_v: D_vv ``[R_v, C]`` (input: the
    previous layer's v_hat), v_up: U_v ``[C, R_v]``: values ``q = U_v @ (D_vk @ k_hat + D_vv @ v_hat_prev) + b``.
    The order of the arithmetic is part of the format (the native cache computes exactly this):
    first the R-vector z (for values the sum of both down products), then U @ z, then the bias.
    """

    k_down: np.ndarray
    k_up: np.ndarray
    v_down_k: np.ndarray
    v_down_v: np.ndarray
    v_up: np.ndarray

    @property
    def rank_k(self) -> int:
        return int(self.k_down.shape[0])

    @property
    def rank_v(self) -> int:
        return int(self.v_up.shape[1])

    @staticmethod
    def shapes(n_channels: int, rank_k: int, rank_v: int) -> dict[str, tuple[int, int]]:
        """Expected numpy shape of every factor field."""
        c = n_channels
        return {"k_down": (rank_k, c), "k_up": (c, rank_k), "v_down_k": (rank_v, c), "v_down_v": (rank_v, c),
                "v_up": (c, rank_v)}

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def map(self, fn) -> LowRankFactors:
        """A copy with ``fn(name, array)`` applied to every factor."""
        return LowRankFactors(**{k: fn(k, v) for k, v in self.arrays().items()})

    def products(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The effective dense weights ``(A = U_k D_k, B_K = U_v D_vk, B_V = U_v D_vv)``, f32 ``[C, C]``.

        Computed in float64 (then rounded to f32) from the factors as they are: for maths only,
        never what the cache computes (it keeps the factored order) and never written.
        """
        def mul(up: np.ndarray, down: np.ndarray) -> np.ndarray:
            return (np.asarray(up, dtype=np.float64) @ np.asarray(down, dtype=np.float64)).astype(np.float32)

        return mul(self.k_up, self.k_down), mul(self.v_up, self.v_down_k), mul(self.v_up, self.v_down_v)


@dataclass
class LayerPredictor:
    """Predictors of one layer l >= 1 (DESIGN §3).

    k_weight: A_l ``[C, C]``; k_bias: a_l ``[C]``: key prediction ``p = A_l @ k_hat_prev + a_l``.
    v_weight_k: B_K ``[C, C]`` (input: this layer's k_hat), v_weight_v: B_V ``[C, C]`` (input:
    the previous layer's v_hat), v_bias: b_l ``[C]``: ``q = B_K @ k_hat + B_V @ v_hat_prev + b_l``.

    factors: None for dense predictors.  For form "lowrank" the factors are the predictor (what
    is written, and what the reference cache multiplies by, in their order); the three dense
    fields then hold the effective products U·D (``LowRankFactors.products``) so that code that
    only needs the maths works unchanged.  Build such a layer with ``from_factors``.
    """

    k_weight: np.ndarray
    k_bias: np.ndarray
    v_weight_k: np.ndarray
    v_weight_v: np.ndarray
    v_bias: np.ndarray
    factors: LowRankFactors | None = None

    @staticmethod
    def from_factors(factors: LowRankFactors, k_bias: np.ndarray, v_bias: np.ndarray) -> LayerPredictor:
        """A low-rank layer whose dense fields are the products of ``factors``."""
        a, b_k, b_v = factors.products()
        return LayerPredictor(k_weight=a, k_bias=k_bias, v_weight_k=b_k, v_weight_v=b_v, v_bias=v_bias,
                              factors=factors)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array: the five dense fields, then the factors' (``k_down``, ...) when low-rank."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "factors"}
        if self.factors is not None:
            out.update(self.factors.arrays())
        return out

    def map(self, fn) -> LayerPredictor:
        """A copy with ``fn(name, array)`` applied to every array (the factors' too)."""
        dense = {f.name: fn(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "factors"}
        return LayerPredictor(**dense, factors=None if self.factors is None else self.factors.map(fn))


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
    predictor_form: "dense" (``[C, C]`` weights) or "lowrank": every layer's predictor is
    ``LayerPredictor.factors`` with key rank ``predictor_rank_k`` and value rank
    ``predictor_rank_v`` (1 <= R <= C; both 0 when dense), about ``C/R`` times fewer FLOPs per
    product pair; low rank and block-diagonal do not combine.
    predictor_value_input: the second input of every value predictor (B_V, D_vv): "v_prev" =
    v̂_{l-1} (the paper's chain), "k_prev" = k̂_{l-1}.  With "k_prev" no value depends on another
    layer's values, so the cache can apply the value predictor to the attention output once per
    query (``Σ_t p_t (B x_t + b + r_t) = B Σ_t p_t x_t + b + Σ_t p_t r_t``) instead of to every cell.
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
    predictor_form: PredictorForm = "dense"
    predictor_rank_k: int = 0
    predictor_rank_v: int = 0
    predictor_value_input: ValueInput = "v_prev"

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
        """Stored size of all predictors (f16 weights and f32 biases by default).

        Dense: three ``[C, C]`` weights per layer; low rank: the factors, ``2·R_k·C + 3·R_v·C``.
        """
        c = self.n_channels
        if self.predictor_form == names.FORM_LOWRANK:
            weights = 2 * self.predictor_rank_k * c + 3 * self.predictor_rank_v * c
        else:
            weights = 3 * c * c
        per_layer = weights * weight_bytes + 2 * c * bias_bytes
        return per_layer * sum(p is not None for p in self.predictors)

    def with_channel_order(self, order: ChannelOrder, *, permutes_qk: bool) -> AquaKVParams:
        """The same parameters in another key-channel order.

        ``permutes_qk`` is the recipe's ``llama_cpp_permutes_qk``: when False both orders coincide.
        With P the permutation matrix of llama_cpp_key_permutation (``k_llama = P @ k_hf``):
        A' = P A Pᵀ, a' = P a, B_K' = B_K Pᵀ; low-rank factors U_k' = P U_k, D_k' = D_k Pᵀ,
        D_vk' = D_vk Pᵀ; value channels are never permuted.
        """
        if order == self.channel_order:
            return self
        new = dataclasses.replace(self, channel_order=order, predictors=list(self.predictors))
        if not permutes_qk:
            return new
        perm = llama_cpp_key_permutation(self.n_kv_heads, self.head_dim)
        if order == "hf":
            perm = np.argsort(perm)
        keys_in_v = self.predictor_value_input == "k_prev"
        new.predictors = [None if p is None else permute_predictor(p, perm, keys_in_v) for p in self.predictors]
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


def permute_predictor(pred: LayerPredictor, perm: np.ndarray, keys_in_v: bool = False) -> LayerPredictor:
    """Apply the key-channel permutation ``perm`` (new[i] = old[perm[i]]) to one layer's predictors.

    Key channels are the output and input of A (rows and columns), the output of a, and the
    input (columns) of B_K; of the low-rank factors, the output (rows) of U_k and the inputs
    (columns) of D_k and D_vk.  ``keys_in_v`` (value input "k_prev"): the inputs of B_V and D_vv
    are keys too.  U_v, b and every value channel stay as they are.
    """
    f = pred.factors
    vcols = perm if keys_in_v else slice(None)
    return LayerPredictor(
        k_weight=pred.k_weight[np.ix_(perm, perm)].copy(),
        k_bias=pred.k_bias[perm].copy(),
        v_weight_k=pred.v_weight_k[:, perm].copy(),
        v_weight_v=pred.v_weight_v[:, vcols].copy(),
        v_bias=pred.v_bias.copy(),
        factors=None if f is None else LowRankFactors(
            k_down=f.k_down[:, perm].copy(), k_up=f.k_up[perm].copy(), v_down_k=f.v_down_k[:, perm].copy(),
            v_down_v=f.v_down_v[:, vcols].copy(), v_up=f.v_up.copy()),
    )


def check_value_input(value_input: str) -> None:
    """Raise ValueError (naming the problem) unless ``value_input`` is one of ``names.VALUE_INPUTS``."""
    if value_input not in names.VALUE_INPUTS:
        raise ValueError(f"unknown value predictor input {value_input!r} "
                         f"(expected one of {', '.join(names.VALUE_INPUTS)})")


def check_predictor_form(form: str, rank_k: int, rank_v: int, n_channels: int, block_size: int = 0) -> None:
    """Raise ValueError (naming the problem) unless ``form`` with these ranks and block size is valid.

    form: one of ``names.PREDICTOR_FORMS``.  "dense" has no ranks (both 0); "lowrank" needs
    ``1 <= rank <= C`` for keys and values and no block size (0 or C: the native cache has no
    block-diagonal low-rank products).
    """
    if form not in names.PREDICTOR_FORMS:
        raise ValueError(f"unknown predictor form {form!r} (expected one of {', '.join(names.PREDICTOR_FORMS)})")
    if form == names.FORM_DENSE:
        if rank_k or rank_v:
            raise ValueError(f"dense predictors have no ranks (got rank_k {rank_k}, rank_v {rank_v})")
        return
    if block_size and block_size != n_channels:
        raise ValueError(f"low-rank predictors cannot also be block-diagonal (block size {block_size})")
    for what, rank in (("rank_k", rank_k), ("rank_v", rank_v)):
        if not 1 <= rank <= n_channels:
            raise ValueError(f"low-rank predictor {what} {rank} must be in [1, C = {n_channels}]")


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
