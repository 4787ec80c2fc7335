"""Calibration: capture pre-RoPE K/V layer by layer and fit the chained AQUA-KV predictors.

Public API:
- ``Recipe``, ``load_recipe(path)``, ``all_recipes()``, ``recipe_for_hf_config(config)``,
  ``recipe_for_gguf_arch(arch)``, ``check_full_attention(config)``: per-architecture recipes.
- ``make_sequences(tokenizer, text, *, n_tokens, seq_len, heldout_fraction, seed, ...)``.
- ``LayerwiseRunner(model, recipe, input_ids, *, batch_size, device).next_layer() -> (k, v)``.
- ``calibrate(model, recipe, input_ids, heldout, *, bits, group_size, ...) -> CalibrationResult``.
- ``RidgeAccumulator``, ``fit_ridge(x, y, reg) -> (W, b)``: ridge with unpenalised bias.
- ``RowQuantizer(grid, group_size)(x) -> x_hat``.
- ``CalibrationError``, ``UnsupportedModelError``, ``CalibrationTextError``.
"""

from .capture import LayerwiseRunner, decoder_layers, flatten_channels, get_submodule, key_value_modules
from .chain import CalibrationResult, LayerReport, calibrate, peak_rss_mib, reports_as_dicts
from .errors import CalibrationError, CalibrationTextError, UnsupportedModelError
from .quantizer import RowQuantizer, bits_to_points
from .recipes import (
                      Recipe,
                      all_recipes,
                      check_full_attention,
                      load_recipe,
                      recipe_for_gguf_arch,
                      recipe_for_hf_config,
                      recipes_dir,
)
from .ridge import ErrorAccumulator, RidgeAccumulator, fit_ridge
from .text import CalibrationSequences, adds_bos, make_sequences, tokenize_text

__all__ = [
    "CalibrationError", "CalibrationResult", "CalibrationSequences", "CalibrationTextError", "ErrorAccumulator",
    "LayerReport", "LayerwiseRunner", "Recipe", "RidgeAccumulator", "RowQuantizer", "UnsupportedModelError",
    "adds_bos", "all_recipes", "bits_to_points", "calibrate", "check_full_attention", "decoder_layers",
    "fit_ridge", "flatten_channels", "get_submodule", "key_value_modules", "load_recipe", "make_sequences",
    "peak_rss_mib", "recipe_for_gguf_arch", "recipe_for_hf_config", "recipes_dir", "reports_as_dicts",
    "tokenize_text",
]
