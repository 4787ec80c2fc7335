"""Capture every layer's pre-RoPE keys and values, propagating the calibration set layer by layer.

All calibration sequences are embedded once; then, for layer l = 0, 1, ..., the decoder layer
runs over the stored hidden states (``[n_seq, seq_len, hidden]``), forward hooks on the
recipe's key and value modules record ``k_l, v_l: [n_seq * seq_len, C]``, and the layer's output
replaces the hidden states.  Only one layer's K/V exist at a time, so memory is
``O(tokens · (hidden + C))`` and does not grow with the number of layers.

The layer inputs other than the hidden states (RoPE cos/sin, causal mask, position ids) are
taken from the model's own forward by stopping it at the first decoder layer (a pre-hook that
raises), so no architecture's forward is re-implemented here.

Speed (calibration is dominated by these forwards: about 7 MFLOP per token and layer for
SmolLM2, i.e. ~55 TFLOP for 256k tokens, at ~110 GFLOPS of float32 GEMM on two cores): the last
layer stops as soon as its key and value modules have run (its attention and MLP outputs are
never used), and ``skip_prefix`` drops each sequence's first tokens (the f16 attention sinks,
which calibration never fits or scores) while copying K/V out of the hooks instead of after.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedModelError
from .recipes import Recipe

log = logging.getLogger(__name__)


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.<path>`` with a clear error naming the recipe path that does not exist."""
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise UnsupportedModelError(f"model {type(root).__name__} has no module {path!r} named by the recipe") from exc


def decoder_layers(model: nn.Module, recipe: Recipe) -> nn.ModuleList:
    layers = get_submodule(model, recipe.layers)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModelError(f"{recipe.layers!r} of {type(model).__name__} is not a list of decoder layers")
    return layers


def key_value_modules(model: nn.Module, recipe: Recipe) -> list[tuple[nn.Module, nn.Module]]:
    """Per layer, the modules whose outputs are the pre-RoPE key and the value."""
    return [(get_submodule(layer, recipe.key), get_submodule(layer, recipe.value))
            for layer in decoder_layers(model, recipe)]


def flatten_channels(t: torch.Tensor) -> torch.Tensor:
    """``[B, T, C]`` or ``[B, T, H, D]`` module output -> ``[B, T, C]`` (head-major channels)."""
    return t.reshape(t.shape[0], t.shape[1], -1)


class _Stop(Exception):
    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]):
        super().__init__()
        self.args_, self.kwargs_ = args, kwargs


class _KVDone(Exception):
    """Raised from a hook once the last layer's K and V are captured: the rest of that layer is not needed."""


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class LayerwiseRunner:
    """Runs calibration sequences through a decoder one layer at a time.

    input_ids: ``[n_seq, seq_len]``.  ``next_layer()`` returns ``(k, v)`` of the next layer,
    each ``[n_seq * (seq_len - skip_prefix), C]`` float32 on ``device`` (sequence-major rows,
    without each sequence's first ``skip_prefix`` tokens), and advances the hidden states
    through that layer.
    """

    def __init__(self, model: nn.Module, recipe: Recipe, input_ids: torch.Tensor, *,
                 batch_size: int = 8, device: torch.device | str = "cpu", skip_prefix: int = 0,
                 reuse_outputs: bool = False):
        """``reuse_outputs``: every ``next_layer()`` writes into the same two K/V buffers (the
        previous call's tensors are overwritten), sparing a fresh ``2·N·C`` allocation, and the
        page faults that fill it, per layer."""
        self.model, self.recipe = model, recipe
        self.device = torch.device(device)
        self.layers = decoder_layers(model, recipe)
        self.kv_modules = key_value_modules(model, recipe)
        self.n_seq, self.seq_len = input_ids.shape
        self.skip_prefix = int(skip_prefix)
        self.reuse_outputs = reuse_outputs
        self._outputs: dict[str, torch.Tensor] = {}
        if not 0 <= self.skip_prefix < self.seq_len:
            raise ValueError(f"skip_prefix {skip_prefix} must be in [0, {self.seq_len})")
        self.batch_size = max(1, int(batch_size))
        self.layer_idx = 0
        self.batches = [slice(s, min(s + self.batch_size, self.n_seq)) for s in range(0, self.n_seq, self.batch_size)]
        self.hidden: torch.Tensor | None = None
        self.layer_kwargs: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        self._embed(input_ids)
        log.info("embedded %d x %d calibration tokens in %.1f s", self.n_seq, self.seq_len, time.perf_counter() - t0)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def _embed(self, input_ids: torch.Tensor) -> None:
        def stop(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            raise _Stop(args, kwargs)

        handle = self.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            for sl in self.batches:
                ids = input_ids[sl].to(self.device)
                try:
                    self.model(input_ids=ids, use_cache=False)
                except _Stop as caught:
                    args, kwargs = caught.args_, dict(caught.kwargs_)
                else:
                    raise UnsupportedModelError("the model never called its first decoder layer")
                hidden = args[0] if args else kwargs.pop("hidden_states")
                kwargs.pop("hidden_states", None)
                if self.hidden is None:
                    self.hidden = torch.empty((self.n_seq, self.seq_len, hidden.shape[-1]), dtype=hidden.dtype,
                                              device=self.device)
                self.hidden[sl] = hidden
                self.layer_kwargs.append(kwargs)
        finally:
            handle.remove()

    @torch.no_grad()
    def next_layer(self, *, advance: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[n_seq * (seq_len - skip_prefix), C]`` of the next layer.

        ``advance`` (default: unless this is the last layer) runs the whole layer and replaces
        the hidden states by its output; without it the layer stops right after K and V.
        """
        if self.layer_idx >= self.n_layers:
            raise IndexError("all layers were already captured")
        layer = self.layers[self.layer_idx]
        key_mod, value_mod = self.kv_modules[self.layer_idx]
        advance = self.layer_idx + 1 < self.n_layers if advance is None else advance
        p = self.skip_prefix
        out_kv: dict[str, torch.Tensor] = {}
        current: dict[str, slice] = {}
        seen: set[str] = set()

        def hook(name: str):
            def fn(_module: nn.Module, _inputs: Any, output: Any) -> None:
                t = flatten_channels(_layer_output(output))  # [b, T, C]
                if name not in out_kv:
                    other = out_kv.get("v" if name == "k" else "k")
                    if other is not None and other.shape[-1] != t.shape[-1]:
                        raise UnsupportedModelError(f"key width {other.shape[-1]} != value width {t.shape[-1]}: "
                                                    "unsupported")
                    shape = (self.n_seq, self.seq_len - p, t.shape[-1])
                    buf = self._outputs.get(name)
                    if buf is None or buf.shape != shape:
                        buf = torch.empty(shape, dtype=torch.float32, device=self.device)
                        if self.reuse_outputs:
                            self._outputs[name] = buf
                    out_kv[name] = buf
                # Straight into the preallocated output (one copy, sinks dropped, cast to f32).
                out_kv[name][current["sl"]] = t[:, p:]
                seen.add(name)
                if not advance and len(seen) == 2:
                    raise _KVDone()
            return fn

        handles = [key_mod.register_forward_hook(hook("k")), value_mod.register_forward_hook(hook("v"))]
        try:
            for sl, kwargs in zip(self.batches, self.layer_kwargs):
                current["sl"] = sl
                seen.clear()
                try:
                    out = _layer_output(layer(self.hidden[sl], **kwargs))
                except _KVDone:
                    continue
                if len(seen) != 2:
                    raise UnsupportedModelError(
                        f"layer {self.layer_idx}: the recipe's key/value modules ({self.recipe.key}, "
                        f"{self.recipe.value}) were not called")
                if advance:
                    self.hidden[sl] = out
        finally:
            for h in handles:
                h.remove()
        if len(out_kv) != 2:
            raise UnsupportedModelError(
                f"layer {self.layer_idx}: the recipe's key/value modules ({self.recipe.key}, {self.recipe.value}) "
                "were not called")
        self.layer_idx += 1
        if self.layer_idx >= self.n_layers:
            self.hidden = None  # frees the largest buffer as soon as the last layer is captured
        k_all, v_all = out_kv["k"], out_kv["v"]
        return k_all.reshape(-1, k_all.shape[-1]), v_all.reshape(-1, v_all.shape[-1])
