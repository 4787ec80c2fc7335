// aquakv-gguf: the AQUA-KV tensors and metadata of a model.aqua.gguf, as loaded by llama.cpp.
//
// Everything here is read once at model load (native/src/aquakv-model.cpp) from the
// aquakv.* keys and tensors that the converter writes (DESIGN §4); the cache reads these
// values and never hard-codes its own.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

struct ggml_tensor;
struct llama_model_base;

// Predictors of one layer l >= 1, in llama.cpp's channel order; C = n_embd_k_gqa.
//   k̂_l = p + Q(k_l - p),  p = k_pred_w · k̂_{l-1} + k_pred_b
//   v̂_l = q + Q(v_l - q),  q = v_pred_k_w · k̂_l + v_pred_v_w · v̂_{l-1} + v_pred_b
// Low-rank form (aquakv.predictor.form = "lowrank"): the dense weights are absent and
//   p = k_up · (k_down · k̂_{l-1}) + k_pred_b
//   q = v_up · (v_down_k · k̂_l + v_down_v · v̂_{l-1}) + v_pred_b
// in that order (the inner R-vector first), as the torch reference computes it.
// aquakv.predictor.value_input = "k_prev" (values_from_keys): v̂_{l-1} above is k̂_{l-1}, so no
// value depends on another layer's values and the read path may apply the value predictor to
// the attention output instead of every cell (aquakv-graph.cpp).
struct aquakv_layer_tensors {
    ggml_tensor * k_pred_w   = nullptr;  // [C, C] (ne0 = input channel); dense only
    ggml_tensor * k_pred_b   = nullptr;  // [C]
    ggml_tensor * v_pred_k_w = nullptr;  // [C, C]; dense only
    ggml_tensor * v_pred_v_w = nullptr;  // [C, C]; dense only
    ggml_tensor * v_pred_b   = nullptr;  // [C]

    ggml_tensor * k_down   = nullptr;  // ne = [C, R_k]; low-rank only
    ggml_tensor * k_up     = nullptr;  // ne = [R_k, C]
    ggml_tensor * v_down_k = nullptr;  // ne = [C, R_v]
    ggml_tensor * v_down_v = nullptr;  // ne = [C, R_v]
    ggml_tensor * v_up     = nullptr;  // ne = [R_v, C]
};

enum aquakv_predictor_kind {
    AQUAKV_PREDICTOR_DENSE   = 0,  // [C, C] weights, optionally block-diagonal (block_size < C)
    AQUAKV_PREDICTOR_LOWRANK = 1,  // factors of rank rank_k / rank_v
};

struct aquakv_model_data {
    uint32_t version       = 0;
    uint32_t grid_dim      = 0;  // d: values per code
    uint32_t grid_size     = 0;  // n: codebook points of layers >= 1
    uint32_t grid0_size    = 0;  // codebook points of layer 0
    uint32_t group_size    = 0;  // G: channels sharing one f16 scale
    uint32_t prefix_tokens = 0;  // P: attention-sink tokens kept in f16
    uint32_t recent_tokens = 0;  // W: recent tokens kept in f16 until a chunk is quantized
    uint32_t n_channels    = 0;  // C
    uint32_t block_size    = 0;  // N: predictor weights are block-diagonal with [N, N] blocks (N = C: dense)
    aquakv_predictor_kind predictor = AQUAKV_PREDICTOR_DENSE;  // aquakv.predictor.form (absent: dense)
    uint32_t rank_k        = 0;  // aquakv.predictor.rank_k (low-rank only)
    uint32_t rank_v        = 0;  // aquakv.predictor.rank_v
    bool     values_from_keys = false;  // aquakv.predictor.value_input == "k_prev" (absent: "v_prev")
    bool     enabled       = true;  // aquakv.enabled (override) / AQUAKV_ENABLED: use the AQUA-KV cache

    ggml_tensor * grid  = nullptr;  // [d, n] f32
    ggml_tensor * grid0 = nullptr;  // [d, n0] f32
    std::vector<aquakv_layer_tensors> layers;  // index = layer; layers[0] is empty

    // one line for the startup log
    std::string describe() const;
};

// Called by the loader after the architecture's own tensors: when the file carries
// aquakv.version, creates every AQUA-KV tensor (a missing one is a load error) and returns
// the parsed data; otherwise returns nullptr and the model loads exactly as before.
// Throws std::runtime_error naming the problem for inconsistent files.
aquakv_model_data * aquakv_load_model_data(llama_model_base & model);
