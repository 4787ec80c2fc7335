"""Torch reference AQUA-KV cache for transformers models: the oracle the native cache must match.

Modes (``AquaKVCache(model, mode=...)``):
- ``"off"``: stores the exact pre-RoPE keys and values and re-applies RoPE; reproduces the plain
  transformers run to float tolerance (tests the pre-RoPE path itself).
- ``"f16"``: every token rounded to f16 (llama.cpp's default cache).
- ``"higgs"``: P f16 sinks, f16 recent window, completed chunks of W tokens quantized with HIGGS
  (same grid, group size, sinks and window as AQUA-KV; no predictors).
- ``"aqua"``: as "higgs" but layer 0 uses the 4-bit grid0 and layers l >= 1 quantize the
  residual of the chained predictors (DESIGN §3), exactly like calibration.

How pre-RoPE keys are obtained: transformers hands ``Cache.update`` keys *after* RoPE and no
sin/cos.  Rather than invert RoPE numerically, a forward hook on the recipe's key module
(``k_proj``, or ``k_norm`` for Qwen3) records the exact tensor RoPE is applied to; ``update``
takes it from there (one tap per model, shared by all caches).  RoPE is re-applied at read time
with the model's own rotary module at each cached token's position, so a cached token's key
changes only when its chunk is quantized.  Sequences are assumed to start at position 0 and
grow contiguously (no left padding, no cropping); all batch rows share positions.
"""

from __future__ import annotations

import weakref
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from aquakv_gguf import quant
from aquakv_gguf.calibrate.capture import flatten_channels, get_submodule, key_value_modules
from aquakv_gguf.calibrate.chain import GRID_DIM, LAYER0_BITS
from aquakv_gguf.calibrate.quantizer import RowQuantizer, bits_to_points
from aquakv_gguf.calibrate.recipes import Recipe, recipe_for_hf_config
from aquakv_gguf.gguf_io.params import AquaKVParams

from .semantics import apply_rope, predict_keys, predict_values, quantized_end, residual_quantize

Mode = Literal["off", "f16", "higgs", "aqua"]
MODES: tuple[str, ...] = ("off", "f16", "higgs", "aqua")


class KeyTap:
    """Forward hooks on every layer's key module keeping the latest pre-RoPE key ``[B, T, C]``."""

    def __init__(self, model: nn.Module, recipe: Recipe):
        self.latest: dict[int, torch.Tensor] = {}
        self.handles = []
        for idx, (key_mod, _value_mod) in enumerate(key_value_modules(model, recipe)):
            self.handles.append(key_mod.register_forward_hook(self._hook(idx)))

    def _hook(self, idx: int):
        def fn(_module: nn.Module, _inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            self.latest[idx] = flatten_channels(out)
        return fn

    def take(self, idx: int) -> torch.Tensor:
        try:
            return self.latest.pop(idx)
        except KeyError:
            raise RuntimeError(f"no pre-RoPE key was recorded for layer {idx}: was update() called outside "
                               "the model's forward?") from None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    @staticmethod
    def for_model(model: nn.Module, recipe: Recipe) -> "KeyTap":
        """The model's tap, created on first use (hooks stay for the model's lifetime)."""
        tap = getattr(model, "_aquakv_key_tap", None)
        if tap is None:
            tap = KeyTap(model, recipe)
            # object.__setattr__ keeps the tap out of nn.Module's registries (it is not a submodule).
            object.__setattr__(model, "_aquakv_key_tap", tap)
        return tap


class AquaKVLayer(DynamicLayer):
    """One layer's cache.

    k_hat, v_hat: ``[B, N, C]`` float32 pre-RoPE representation attention sees (f16-rounded sinks
    and window, reconstructions for quantized chunks); raw_k, raw_v: ``[B, N - q_end, C]`` the
    exact values of the not-yet-quantized tokens after the sinks; keys/values (returned to
    attention): ``[B, H, N, D]`` in the model's dtype, keys with RoPE applied.
    """

    def __init__(self, owner: "AquaKVCache", layer_idx: int):
        super().__init__()
        self._owner = weakref.proxy(owner)
        self.layer_idx = layer_idx
        self.k_hat: torch.Tensor | None = None
        self.v_hat: torch.Tensor | None = None
        self.raw_k: torch.Tensor | None = None
        self.raw_v: torch.Tensor | None = None
        self.q_end = owner.prefix_tokens

    @property
    def n_tokens(self) -> int:
        return 0 if self.k_hat is None else int(self.k_hat.shape[1])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("AquaKVCache does not support cropping")

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``k_new`` (pre-RoPE), ``v_new``: ``[B, T, C]``; return keys/values ``[B, H, N, D]``."""
        o = self._owner
        n0 = self.n_tokens
        n1 = n0 + k_new.shape[1]
        k_new, v_new = k_new.float(), v_new.float()
        k_store, v_store = o.store(k_new), o.store(v_new)
        if self.k_hat is None:
            self.k_hat, self.v_hat = k_store, v_store
            self.raw_k, self.raw_v = k_new[:, :0], v_new[:, :0]
        else:
            self.k_hat = torch.cat([self.k_hat, k_store], dim=1)
            self.v_hat = torch.cat([self.v_hat, v_store], dim=1)
        if o.quantizes:
            skip = max(0, o.prefix_tokens - n0)  # new tokens that are sinks are never quantized
            self.raw_k = torch.cat([self.raw_k, k_new[:, skip:]], dim=1)
            self.raw_v = torch.cat([self.raw_v, v_new[:, skip:]], dim=1)

        changed = n0
        if o.quantizes:
            end = quantized_end(n1, o.prefix_tokens, o.recent_tokens)
            if end > self.q_end:
                s, e = self.q_end, end
                k_q, v_q = o.reconstruct(self.layer_idx, self.raw_k[:, : e - s], self.raw_v[:, : e - s], s, e)
                self.k_hat[:, s:e], self.v_hat[:, s:e] = k_q, v_q
                self.raw_k, self.raw_v = self.raw_k[:, e - s:], self.raw_v[:, e - s:]
                self.q_end = e
                changed = min(changed, s)

        bsz, _, c = self.k_hat.shape
        heads, head_dim = o.n_kv_heads, c // o.n_kv_heads
        k_part = self.k_hat[:, changed:n1].reshape(bsz, n1 - changed, heads, head_dim).transpose(1, 2)
        v_part = self.v_hat[:, changed:n1].reshape(bsz, n1 - changed, heads, head_dim).transpose(1, 2)
        k_rot = o.rope(k_part.to(out_dtype), changed, n1)
        v_part = v_part.to(out_dtype)
        if self.keys is None or not self.is_initialized:
            self.device = k_rot.device
            self.is_initialized = True
            self.keys, self.values = k_rot.contiguous(), v_part.contiguous()
        else:
            self.keys = torch.cat([self.keys[:, :, :changed], k_rot], dim=2)
            self.values = torch.cat([self.values[:, :, :changed], v_part], dim=2)
        return self.keys, self.values


class AquaKVCache(Cache):
    """AQUA-KV reference cache; pass as ``model(..., cache=cache, use_cache=True)``.

    ``params`` (mode "aqua") may be in either channel order; llama.cpp order is mapped back to
    Hugging Face order with the recipe's permutation flag.  Mode "higgs" takes ``bits`` (and
    optionally ``layer0_bits``); group size defaults to ``quant.choose_group_size(C, head_dim)``.
    """

    def __init__(self, model: nn.Module, *, mode: Mode = "aqua", params: AquaKVParams | None = None,
                 bits: int | None = None, layer0_bits: int | None = None, group_size: int | None = None,
                 prefix_tokens: int = 4, recent_tokens: int = 128, recipe: Recipe | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        config = model.config
        self.recipe = recipe or recipe_for_hf_config(config)
        self.mode = mode
        self.n_layers = int(config.num_hidden_layers)
        self.n_kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        c = self.n_kv_heads * self.head_dim
        self.prefix_tokens, self.recent_tokens = prefix_tokens, recent_tokens
        self.params = None
        self._pred: list[tuple[torch.Tensor, ...] | None] = []
        if mode == "aqua":
            if params is None:
                raise ValueError("mode 'aqua' needs params (from calibration or read_aqua_gguf)")
            if (params.n_layers, params.n_kv_heads, params.head_dim) != (self.n_layers, self.n_kv_heads, self.head_dim):
                raise ValueError(f"params are for {params.n_layers} layers x {params.n_kv_heads} x {params.head_dim}, "
                                 f"the model has {self.n_layers} x {self.n_kv_heads} x {self.head_dim}")
            self.params = params.with_channel_order("hf", permutes_qk=self.recipe.llama_cpp_permutes_qk)
            self.prefix_tokens, self.recent_tokens = self.params.prefix_tokens, self.params.recent_tokens
            self.group_size = self.params.group_size
            self.q = RowQuantizer(self.params.grid, self.group_size)
            self.q0 = RowQuantizer(self.params.grid0, self.group_size)
        elif mode == "higgs":
            if bits is None:
                raise ValueError("mode 'higgs' needs bits")
            self.group_size = int(group_size or quant.choose_group_size(c, self.head_dim))
            self.q = RowQuantizer(quant.gaussian_grid(bits_to_points(bits, GRID_DIM), dim=GRID_DIM), self.group_size)
            self.q0 = (RowQuantizer(quant.gaussian_grid(bits_to_points(layer0_bits, GRID_DIM), dim=GRID_DIM), self.group_size)
                       if layer0_bits else self.q)
        self.bits = bits if mode == "higgs" else (self.params.bits if self.params else None)
        self.quantizes = mode in ("higgs", "aqua")
        self.rotary = get_submodule(model, self.recipe.rotary)
        self.tap = KeyTap.for_model(model, self.recipe)
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
        super().__init__(layers=[AquaKVLayer(self, i) for i in range(self.n_layers)])

    # -- storage and reconstruction -------------------------------------------------------------
    def store(self, x: torch.Tensor) -> torch.Tensor:
        """How an unquantized token is kept: exact in mode "off", f16 otherwise."""
        return x.clone() if self.mode == "off" else x.to(torch.float16).to(torch.float32)

    def _predictors(self, layer: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        while len(self._pred) <= layer:
            self._pred.append(None)
        if self._pred[layer] is None or self._pred[layer][0].device != device:
            p = self.params.predictors[layer]
            self._pred[layer] = tuple(torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)
                                      for a in (p.k_weight, p.k_bias, p.v_weight_k, p.v_weight_v, p.v_bias))
        return self._pred[layer]

    def reconstruct(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, end: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantized representation of positions ``[start, end)``: k, v ``[B, end-start, C]`` exact values."""
        if self.mode == "higgs":
            q = self.q0 if layer == 0 else self.q
            return q(k), q(v)
        if layer == 0:
            return self.q0(k), self.q0(v)
        prev = self.layers[layer - 1]
        if prev.q_end < end:
            raise RuntimeError(f"layer {layer - 1} has not quantized positions up to {end}: layers out of order")
        k_prev, v_prev = prev.k_hat[:, start:end], prev.v_hat[:, start:end]
        a_w, a_b, b_k, b_v, b_b = self._predictors(layer, k.device)
        k_hat = residual_quantize(k, predict_keys(k_prev, a_w, a_b), self.q)
        v_hat = residual_quantize(v, predict_values(k_hat, v_prev, b_k, b_v, b_b), self.q)
        return k_hat, v_hat

    def rope(self, k: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """RoPE for positions ``[start, end)`` of keys ``[B, H, end-start, D]``."""
        cached = self._cos_sin
        if cached is None or cached[0].shape[1] < end or cached[0].dtype != k.dtype or cached[0].device != k.device:
            n = max(end, 2 * (cached[0].shape[1] if cached is not None else 0), 256)
            pos = torch.arange(n, device=k.device).unsqueeze(0)
            with torch.no_grad():
                cos, sin = self.rotary(k, pos)
            self._cos_sin = cached = (cos, sin)
        cos, sin = cached
        return apply_rope(k, cos[:, start:end], sin[:, start:end])

    # -- transformers Cache API -----------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states (post-RoPE, unused but for shapes)/value_states: ``[B, H, T, D]``."""
        k_pre = self.tap.take(layer_idx)
        bsz, heads, t, d = key_states.shape
        if k_pre.shape != (bsz, t, heads * d):
            raise RuntimeError(f"layer {layer_idx}: recorded pre-RoPE key {tuple(k_pre.shape)} does not match "
                               f"the keys {tuple(key_states.shape)} given to the cache")
        v = value_states.transpose(1, 2).reshape(bsz, t, heads * d)
        return self.layers[layer_idx].append(k_pre, v, key_states.dtype)

    def close(self) -> None:
        """Drop the cached tensors (the model's key tap is shared and stays)."""
        self.layers = []

    def __enter__(self) -> "AquaKVCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
