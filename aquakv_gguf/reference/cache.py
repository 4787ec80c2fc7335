"""Torch reference AQUA-KV cache for transformers models: the oracle the native cache must match.

Modes (``AquaKVCache(model, mode=...)``):
- ``"off"``: stores the exact pre-RoPE keys and values and re-applies RoPE; reproduces the plain
  transformers run to float tolerance (tests the pre-RoPE path itself).
- ``"f16"``: every token rounded to f16 (llama.cpp's default cache).
- ``"higgs"``: P f16 sinks, f16 recent window, completed chunks of W tokens quantized with HIGGS
  (same grid, group size, sinks and window as AQUA-KV; no predictors).
- ``"aqua"``: as "higgs" but layer 0 uses the 4-bit grid0 and layers l >= 1 quantize the
  residual of the chained predictors (DESIGN §3), exactly like calibration; low-rank predictors
  (``predictor_form == "lowrank"``) multiply by their factors in the format's order.

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
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from aquakv_gguf import quant
from aquakv_gguf.calibrate.capture import flatten_channels, get_submodule, key_value_modules
from aquakv_gguf.calibrate.chain import GRID_DIM
from aquakv_gguf.calibrate.quantizer import RowQuantizer, bits_to_points, key_quantizer
from aquakv_gguf.calibrate.recipes import Recipe, recipe_for_hf_config
from aquakv_gguf.gguf_io.params import AquaKVParams

from . import semantics
from .semantics import apply_rope, quantized_end, residual_quantize

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
    def for_model(model: nn.Module, recipe: Recipe) -> KeyTap:
        """The model's tap, created on first use (hooks stay for the model's lifetime)."""
        tap = getattr(model, "_aquakv_key_tap", None)
        if tap is None:
            tap = KeyTap(model, recipe)
            # object.__setattr__ keeps the tap out of nn.Module's registries (it is not a submodule).
            object.__setattr__(model, "_aquakv_key_tap", tap)
        return tap


def _grow(buf: torch.Tensor | None, dim: int, need: int, like: torch.Tensor) -> torch.Tensor:
    """A buffer shaped like ``like`` with at least ``need`` slots along ``dim`` (capacity doubles)."""
    if buf is not None and buf.shape[dim] >= need:
        return buf
    cap = max(need, 256, 2 * (buf.shape[dim] if buf is not None else 0))
    shape = list(like.shape)
    shape[dim] = cap
    new = torch.zeros(shape, dtype=like.dtype, device=like.device)
    if buf is not None:
        new.narrow(dim, 0, buf.shape[dim]).copy_(buf)
    return new


@dataclass
class RowConfig:
    """How one batch row is cached: mode "off"/"f16"/"higgs"/"aqua" and its quantizers/predictors."""

    mode: str
    q: RowQuantizer | None = None
    q0: RowQuantizer | None = None
    params: AquaKVParams | None = None
    # the same quantizers for keys, applied in llama.cpp's channel order (calibrate.quantizer.key_quantizer)
    qk: Any = None
    q0k: Any = None
    bits: float | None = None
    _pred: dict[tuple[int, torch.device], tuple[torch.Tensor, ...]] = field(default_factory=dict)

    @property
    def quantizes(self) -> bool:
        return self.mode in ("higgs", "aqua")

    @property
    def lowrank(self) -> bool:
        return self.params is not None and self.params.predictor_form == "lowrank"

    def predictors(self, layer: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """float32 on ``device``: dense ``(A [C,C], a [C], B_K [C,C], B_V [C,C], b [C])``; low rank
        ``(D_k [R_k,C], U_k [C,R_k], a [C], D_vk [R_v,C], D_vv [R_v,C], U_v [C,R_v], b [C])``."""
        key = (layer, device)
        if key not in self._pred:
            p = self.params.predictors[layer]
            f = p.factors
            arrays = ((f.k_down, f.k_up, p.k_bias, f.v_down_k, f.v_down_v, f.v_up, p.v_bias) if self.lowrank
                      else (p.k_weight, p.k_bias, p.v_weight_k, p.v_weight_v, p.v_bias))
            self._pred[key] = tuple(torch.as_tensor(np.asarray(a, dtype=np.float32), device=device) for a in arrays)
        return self._pred[key]


class AquaKVLayer(DynamicLayer):
    """One layer's cache.

    k_hat, v_hat: ``[B, N, C]`` float32 pre-RoPE representation attention sees (f16-rounded sinks
    and window, reconstructions for quantized chunks); raw_k, raw_v: ``[B, N - q_end, C]`` the
    stored (f16-rounded) values of the not-yet-quantized tokens after the sinks; keys/values (returned to
    attention): ``[B, H, N, D]`` in the model's dtype, keys with RoPE applied.  All four live in
    buffers that double in capacity, so a step costs O(new tokens), not O(N).
    """

    def __init__(self, owner: AquaKVCache, layer_idx: int):
        super().__init__()
        self._owner = weakref.proxy(owner)
        self.layer_idx = layer_idx
        self.n = 0
        self._k_hat = self._v_hat = self._keys = self._values = None
        self.raw_k: torch.Tensor | None = None
        self.raw_v: torch.Tensor | None = None
        self.q_end = owner.prefix_tokens

    @property
    def n_tokens(self) -> int:
        return self.n

    @property
    def k_hat(self) -> torch.Tensor:
        return self._k_hat[:, : self.n]

    @property
    def v_hat(self) -> torch.Tensor:
        return self._v_hat[:, : self.n]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("AquaKVCache does not support cropping")

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``k_new`` (pre-RoPE), ``v_new``: ``[B, T, C]``; return keys/values ``[B, H, N, D]``."""
        o = self._owner
        n0, t = self.n, k_new.shape[1]
        n1 = n0 + t
        k_new, v_new = k_new.float(), v_new.float()
        self._k_hat = _grow(self._k_hat, 1, n1, k_new)
        self._v_hat = _grow(self._v_hat, 1, n1, v_new)
        k_stored, v_stored = o.store(k_new), o.store(v_new)
        self._k_hat[:, n0:n1] = k_stored
        self._v_hat[:, n0:n1] = v_stored
        self.n = n1
        if o.quantizes:
            # A chunk is quantized from what the window holds: the f16 values (as the native cache
            # does; a token quantized on arrival is rounded the same way).
            skip = max(0, o.prefix_tokens - n0)  # new tokens that are sinks are never quantized
            if self.raw_k is None:
                self.raw_k, self.raw_v = k_stored[:, skip:], v_stored[:, skip:]
            else:
                self.raw_k = torch.cat([self.raw_k, k_stored[:, skip:]], dim=1)
                self.raw_v = torch.cat([self.raw_v, v_stored[:, skip:]], dim=1)

        changed = n0
        if o.quantizes:
            end = quantized_end(n1, o.prefix_tokens, o.recent_tokens)
            if end > self.q_end:
                s, e = self.q_end, end
                o.reconstruct_into(self, self.raw_k[:, : e - s], self.raw_v[:, : e - s], s, e)
                self.raw_k, self.raw_v = self.raw_k[:, e - s:], self.raw_v[:, e - s:]
                self.q_end = e
                changed = min(changed, s)

        bsz, _, c = k_new.shape
        heads, head_dim = o.n_kv_heads, c // o.n_kv_heads
        m = n1 - changed
        k_part = self._k_hat[:, changed:n1].reshape(bsz, m, heads, head_dim).transpose(1, 2)
        v_part = self._v_hat[:, changed:n1].reshape(bsz, m, heads, head_dim).transpose(1, 2)
        k_rot = o.rope(k_part.to(out_dtype), changed, n1)
        self._keys = _grow(self._keys, 2, n1, k_rot)
        self._values = _grow(self._values, 2, n1, k_rot)
        self._keys[:, :, changed:n1] = k_rot
        self._values[:, :, changed:n1] = v_part.to(out_dtype)
        self.device = k_rot.device
        self.is_initialized = True
        self.keys, self.values = self._keys[:, :, :n1], self._values[:, :, :n1]
        return self.keys, self.values


class AquaKVCache(Cache):
    """AQUA-KV reference cache; pass as ``model(..., cache=cache, use_cache=True)``.

    ``params`` (mode "aqua") may be in either channel order; llama.cpp order is mapped back to
    Hugging Face order with the recipe's permutation flag.  Mode "higgs" takes ``bits`` (and
    optionally ``layer0_bits``); group size defaults to ``quant.choose_group_size(C, head_dim)``.

    ``rows=[dict(mode=..., params=..., bits=...), ...]`` gives every batch row its own
    configuration instead (same token policy for all): the evaluation runs f16, HIGGS and AQUA-KV
    side by side in one batch that way, so each weight matrix is read once per step.
    """

    def __init__(self, model: nn.Module, *, mode: Mode = "aqua", params: AquaKVParams | None = None,
                 bits: int | None = None, layer0_bits: int | None = None, group_size: int | None = None,
                 prefix_tokens: int = 4, recent_tokens: int = 128, recipe: Recipe | None = None,
                 rows: list[dict[str, Any]] | None = None):
        specs = rows if rows is not None else [dict(mode=mode, params=params, bits=bits, layer0_bits=layer0_bits)]
        for s in specs:
            if s.get("mode", "aqua") not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {s.get('mode')!r}")
        config = model.config
        self.recipe = recipe or recipe_for_hf_config(config)
        self.n_layers = int(config.num_hidden_layers)
        self.n_kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.prefix_tokens, self.recent_tokens = prefix_tokens, recent_tokens
        self.row_configs = [self._row_config(group_size=group_size, **s) for s in specs]
        policies = {(r.params.prefix_tokens, r.params.recent_tokens) for r in self.row_configs if r.params is not None}
        if len(policies) > 1:
            raise ValueError(f"rows disagree on the token policy (prefix, recent): {sorted(policies)}")
        if policies:
            self.prefix_tokens, self.recent_tokens = policies.pop()
        self.quantizes = any(r.quantizes for r in self.row_configs)
        first = self.row_configs[0]
        self.mode, self.params, self.bits = first.mode, first.params, first.bits
        self.rotary = get_submodule(model, self.recipe.rotary)
        self.tap = KeyTap.for_model(model, self.recipe)
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
        super().__init__(layers=[AquaKVLayer(self, i) for i in range(self.n_layers)])

    def _row_config(self, *, mode: str = "aqua", params: AquaKVParams | None = None, bits: int | None = None,
                    layer0_bits: int | None = None, group_size: int | None = None) -> RowConfig:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        c = self.n_kv_heads * self.head_dim
        if mode == "aqua":
            if params is None:
                raise ValueError("mode 'aqua' needs params (from calibration or read_aqua_gguf)")
            if (params.n_layers, params.n_kv_heads, params.head_dim) != (self.n_layers, self.n_kv_heads, self.head_dim):
                raise ValueError(f"params are for {params.n_layers} layers x {params.n_kv_heads} x {params.head_dim}, "
                                 f"the model has {self.n_layers} x {self.n_kv_heads} x {self.head_dim}")
            hf = params.with_channel_order("hf", permutes_qk=self.recipe.llama_cpp_permutes_qk)
            q, q0 = RowQuantizer(hf.grid, hf.group_size), RowQuantizer(hf.grid0, hf.group_size)
            return RowConfig("aqua", q=q, q0=q0, qk=self._key_q(q), q0k=self._key_q(q0), params=hf, bits=hf.bits)
        if mode == "higgs":
            if bits is None:
                raise ValueError("mode 'higgs' needs bits")
            group = int(group_size or quant.choose_group_size(c, self.head_dim))
            q = RowQuantizer(quant.gaussian_grid(bits_to_points(bits, GRID_DIM), dim=GRID_DIM), group)
            q0 = (RowQuantizer(quant.gaussian_grid(bits_to_points(layer0_bits, GRID_DIM), dim=GRID_DIM), group)
                  if layer0_bits else q)
            return RowConfig("higgs", q=q, q0=q0, qk=self._key_q(q), q0k=self._key_q(q0), bits=bits)
        return RowConfig(mode)

    def _key_q(self, q: RowQuantizer):
        """``q`` for keys: in llama.cpp channel order when the recipe permutes Q/K (as the native cache sees them)."""
        return key_quantizer(q, self.n_kv_heads, self.head_dim, self.recipe.llama_cpp_permutes_qk)

    def _row_groups(self, bsz: int) -> list[tuple[RowConfig, list[int]]]:
        """Rows sharing one configuration, so each is processed as one batch."""
        if len(self.row_configs) == 1:
            return [(self.row_configs[0], list(range(bsz)))]
        if len(self.row_configs) != bsz:
            raise ValueError(f"the cache has {len(self.row_configs)} row configurations, the batch has {bsz} rows")
        groups: dict[int, tuple[RowConfig, list[int]]] = {}
        for i, cfg in enumerate(self.row_configs):
            groups.setdefault(id(cfg), (cfg, []))[1].append(i)
        return list(groups.values())

    # -- storage and reconstruction -------------------------------------------------------------
    def store(self, x: torch.Tensor) -> torch.Tensor:
        """How unquantized tokens ``[B, T, C]`` are kept: exact in mode "off", f16 otherwise."""
        out = x.to(torch.float16).to(torch.float32)
        for cfg, rows in self._row_groups(x.shape[0]):
            if cfg.mode == "off":
                out[rows] = x[rows]
        return out

    def reconstruct_into(self, layer: AquaKVLayer, k: torch.Tensor, v: torch.Tensor, start: int, end: int) -> None:
        """Write the quantized representation of positions ``[start, end)`` into ``layer``'s k_hat/v_hat.

        k, v: ``[B, end-start, C]`` exact values.  Rows in f16/off mode keep their stored values.
        """
        for cfg, rows in self._row_groups(k.shape[0]):
            if not cfg.quantizes:
                continue
            idx = torch.tensor(rows, device=k.device)
            k_hat, v_hat = self._reconstruct(cfg, layer.layer_idx, k[idx], v[idx], idx, start, end)
            layer._k_hat[idx, start:end] = k_hat
            layer._v_hat[idx, start:end] = v_hat

    def _reconstruct(self, cfg: RowConfig, layer: int, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                     start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if cfg.mode == "higgs" or layer == 0:
            q, qk = (cfg.q0, cfg.q0k) if layer == 0 else (cfg.q, cfg.qk)
            return qk(k), q(v)
        prev = self.layers[layer - 1]
        if prev.q_end < end:
            raise RuntimeError(f"layer {layer - 1} has not quantized positions up to {end}: layers out of order")
        k_prev = prev.k_hat[idx, start:end]
        # the value predictor's second input: v̂_{l-1} (the paper's chain) or k̂_{l-1}
        v_prev = k_prev if cfg.params.predictor_value_input == "k_prev" else prev.v_hat[idx, start:end]
        if cfg.lowrank:
            d_k, u_k, a_b, d_vk, d_vv, u_v, b_b = cfg.predictors(layer, k.device)
            k_hat = residual_quantize(k, semantics.predict_keys_lowrank(k_prev, d_k, u_k, a_b), cfg.qk)
            q = semantics.predict_values_lowrank(k_hat, v_prev, d_vk, d_vv, u_v, b_b)
            v_hat = residual_quantize(v, q, cfg.q)
            return k_hat, v_hat
        a_w, a_b, b_k, b_v, b_b = cfg.predictors(layer, k.device)
        k_hat = residual_quantize(k, semantics.predict_keys(k_prev, a_w, a_b), cfg.qk)
        v_hat = residual_quantize(v, semantics.predict_values(k_hat, v_prev, b_k, b_v, b_b), cfg.q)
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
        """key_states (post-RoPE, used for shapes only)/value_states: ``[B, H, T, D]``."""
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

    def __enter__(self) -> AquaKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
