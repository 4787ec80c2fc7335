"""Names of the ``aquakv.*`` metadata keys and tensors (DESIGN §4); the native loader uses the same strings."""

from __future__ import annotations

FORMAT_VERSION = 1

KEY_VERSION = "aquakv.version"
KEY_GRID_DIM = "aquakv.grid.dim"
KEY_GRID_SIZE = "aquakv.grid.size"
KEY_GRID0_SIZE = "aquakv.grid0.size"
KEY_GROUP_SIZE = "aquakv.group_size"
KEY_PREFIX_TOKENS = "aquakv.prefix_tokens"
KEY_RECENT_TOKENS = "aquakv.recent_tokens"
# optional: predictor weights are block-diagonal with blocks of this size (absent or = C: dense)
KEY_PREDICTOR_BLOCK = "aquakv.predictor.block_size"
CALIBRATION_PREFIX = "aquakv.calibration."

TENSOR_GRID = "aquakv.grid"
TENSOR_GRID0 = "aquakv.grid0"

# Per layer N >= 1.  Weight arrays are numpy [C_out, C_in]; GGUF lists them as ne = [C_in, C_out]
# (ne0 is the fastest dimension), which is llama.cpp's weight convention: ggml_mul_mat(W, x)
# with x: ne = [C_in, n_tokens] gives W @ x, ne = [C_out, n_tokens].
K_PRED_WEIGHT = "blk.{layer}.aquakv_k_pred.weight"
K_PRED_BIAS = "blk.{layer}.aquakv_k_pred.bias"
V_PRED_K_WEIGHT = "blk.{layer}.aquakv_v_pred_k.weight"
V_PRED_V_WEIGHT = "blk.{layer}.aquakv_v_pred_v.weight"
V_PRED_BIAS = "blk.{layer}.aquakv_v_pred.bias"

# LayerPredictor field -> tensor name template
LAYER_TENSORS: dict[str, str] = {
    "k_weight": K_PRED_WEIGHT,
    "k_bias": K_PRED_BIAS,
    "v_weight_k": V_PRED_K_WEIGHT,
    "v_weight_v": V_PRED_V_WEIGHT,
    "v_bias": V_PRED_BIAS,
}
WEIGHT_FIELDS = ("k_weight", "v_weight_k", "v_weight_v")
BIAS_FIELDS = ("k_bias", "v_bias")


def is_aquakv_tensor(name: str) -> bool:
    return name.startswith("aquakv.") or ".aquakv_" in name


def is_aquakv_key(name: str) -> bool:
    return name.startswith("aquakv.")
