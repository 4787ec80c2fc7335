"""The AQUA-KV arithmetic shared by calibration and the reference cache (DESIGN §3).

Pure torch and small on purpose: calibration and the cache call these same functions, so a
token's reconstruction is bit-for-bit the same whether it is computed while fitting or while
decoding.  Channel vectors are the last dimension (``[..., C]``); weights are ``[C_out, C_in]``
and predictions are ``x @ W.T + b`` (= ``W @ x + b`` per token).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Quantizer = Callable[[torch.Tensor], torch.Tensor]


def quantized_end(n_tokens: int, prefix_tokens: int, recent_tokens: int) -> int:
    """End (exclusive) of the quantized positions once ``n_tokens`` tokens are cached.

    Positions ``[0, P)`` are f16 sinks forever; positions ``[P, end)`` are quantized, in whole
    chunks of ``W`` that complete as soon as their last token arrives; ``[end, n_tokens)`` is the
    f16 recent window (0 to W-1 tokens).  A token's fate depends only on its position and on
    how many tokens the cache holds, never on how the tokens were batched.
    """
    if n_tokens <= prefix_tokens:
        return prefix_tokens
    return prefix_tokens + ((n_tokens - prefix_tokens) // recent_tokens) * recent_tokens


def predict_keys(k_hat_prev: torch.Tensor, a_w: torch.Tensor, a_b: torch.Tensor) -> torch.Tensor:
    """``p = A k̂_{l-1} + a``: k_hat_prev ``[..., C]``, a_w ``[C, C]``, a_b ``[C]`` -> ``[..., C]``."""
    return torch.matmul(k_hat_prev, a_w.T) + a_b


def predict_values(k_hat: torch.Tensor, v_hat_prev: torch.Tensor, b_k: torch.Tensor, b_v: torch.Tensor,
                   b_b: torch.Tensor) -> torch.Tensor:
    """``q = B_K k̂_l + B_V v̂_{l-1} + b``: inputs ``[..., C]``, weights ``[C, C]`` -> ``[..., C]``."""
    return torch.matmul(k_hat, b_k.T) + torch.matmul(v_hat_prev, b_v.T) + b_b


def predict_keys_lowrank(k_hat_prev: torch.Tensor, k_down: torch.Tensor, k_up: torch.Tensor,
                         a_b: torch.Tensor) -> torch.Tensor:
    """``p = U_k (D_k k̂_{l-1}) + a``: k_down ``[R, C]``, k_up ``[C, R]``, a_b ``[C]``; ``[..., C] -> [..., C]``.

    In the format's order (the native cache's): the R-vector ``z = D_k k̂`` first, then ``U_k z``,
    then the bias; never through the product ``U_k D_k``.
    """
    return torch.matmul(torch.matmul(k_hat_prev, k_down.T), k_up.T) + a_b


def predict_values_lowrank(k_hat: torch.Tensor, v_hat_prev: torch.Tensor, v_down_k: torch.Tensor,
                           v_down_v: torch.Tensor, v_up: torch.Tensor, b_b: torch.Tensor) -> torch.Tensor:
    """``q = U_v (D_vk k̂_l + D_vv v̂_{l-1}) + b``: downs ``[R, C]``, v_up ``[C, R]``; ``[..., C] -> [..., C]``.

    Order as in predict_keys_lowrank: ``z = D_vk k̂ + D_vv v̂`` (the two R-vectors summed), then
    ``U_v z``, then the bias.
    """
    z = torch.matmul(k_hat, v_down_k.T) + torch.matmul(v_hat_prev, v_down_v.T)
    return torch.matmul(z, v_up.T) + b_b


def residual_quantize(x: torch.Tensor, pred: torch.Tensor, quantizer: Quantizer) -> torch.Tensor:
    """``pred + Q(x − pred)``."""
    return pred + quantizer(x - pred)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotate_half on the last dimension: ``[x1, x2] -> [-x2, x1]``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers applies it to keys: k ``[B, H, T, D]``, cos/sin ``[B|1, T, D]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (k * cos) + (rotate_half(k) * sin)
