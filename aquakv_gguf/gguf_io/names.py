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
# string, one of PREDICTOR_FORMS; absent (files written before it existed) means "dense"
KEY_PREDICTOR_FORM = "aquakv.predictor.form"
# uint32 ranks R_k, R_v of the low-rank factors (only with form "lowrank"; 1 <= R <= C)
KEY_PREDICTOR_RANK_K = "aquakv.predictor.rank_k"
KEY_PREDICTOR_RANK_V = "aquakv.predictor.rank_v"
FORM_DENSE = "dense"
FORM_LOWRANK = "lowrank"
PREDICTOR_FORMS = (FORM_DENSE, FORM_LOWRANK)
# string, one of VALUE_INPUTS: the value predictor's second input (B_V / D_vv multiply it);
# absent (files written before it existed) means "v_prev"
KEY_PREDICTOR_VALUE_INPUT = "aquakv.predictor.value_input"
VALUE_INPUT_V_PREV = "v_prev"  # v̂_{l-1}: the paper's chain
VALUE_INPUT_K_PREV = "k_prev"  # k̂_{l-1}: values have no chain, the cache may fold them onto the attention output
VALUE_INPUTS = (VALUE_INPUT_V_PREV, VALUE_INPUT_K_PREV)
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
# Low-rank form, instead of the three dense weights (same orientation: numpy [out, in]):
# p = U_k @ (D_k @ k_hat_prev) + a;  q = U_v @ (D_vk @ k_hat + D_vv @ v_hat_prev) + b.
K_PRED_DOWN = "blk.{layer}.aquakv_k_pred_down.weight"  # D_k  [R_k, C]
K_PRED_UP = "blk.{layer}.aquakv_k_pred_up.weight"  # U_k  [C, R_k]
V_PRED_K_DOWN = "blk.{layer}.aquakv_v_pred_k_down.weight"  # D_vk [R_v, C]
V_PRED_V_DOWN = "blk.{layer}.aquakv_v_pred_v_down.weight"  # D_vv [R_v, C]
V_PRED_UP = "blk.{layer}.aquakv_v_pred_up.weight"  # U_v  [C, R_v]

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
# LowRankFactors field -> tensor name template (a low-rank layer stores these plus the BIAS_FIELDS)
LOWRANK_TENSORS: dict[str, str] = {
    "k_down": K_PRED_DOWN,
    "k_up": K_PRED_UP,
    "v_down_k": V_PRED_K_DOWN,
    "v_down_v": V_PRED_V_DOWN,
    "v_up": V_PRED_UP,
}

# a low-rank layer's tensors: the factors, then the biases (no dense weights)
LOWRANK_LAYER_TENSORS: dict[str, str] = {**LOWRANK_TENSORS, **{f: LAYER_TENSORS[f] for f in BIAS_FIELDS}}


def layer_tensor_templates(form: str) -> dict[str, str]:
    """Field -> tensor name template of one layer l >= 1 of predictor form ``form``."""
    return LOWRANK_LAYER_TENSORS if form == FORM_LOWRANK else LAYER_TENSORS


def is_aquakv_tensor(name: str) -> bool:
    return name.startswith("aquakv.") or ".aquakv_" in name


def is_aquakv_key(name: str) -> bool:
    return name.startswith("aquakv.")
