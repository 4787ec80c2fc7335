// aquakv-gguf: creation of the AQUA-KV tensors while llama.cpp loads a model.

#include "aquakv-model.h"

#include "llama-arch.h"
#include "llama-impl.h"
#include "llama-model-loader.h"
#include "llama-model.h"

#include <cstdlib>
#include <memory>
#include <stdexcept>

namespace {

uint32_t get_u32(llama_model_loader & ml, const char * key) {
    uint32_t value = 0;
    if (!ml.get_key(std::string(key), value, false)) {
        throw std::runtime_error(std::string("aquakv: the model has aquakv.version but no ") + key);
    }
    return value;
}

bool is_power_of_two(uint32_t x) {
    return x != 0 && (x & (x - 1)) == 0;
}

} // namespace

std::string aquakv_model_data::describe() const {
    const std::string form = predictor == AQUAKV_PREDICTOR_LOWRANK
        ? format("low-rank (keys %u, values %u)", rank_k, rank_v)
        : block_size == n_channels ? std::string("dense") : format("%ux%u block-diagonal", block_size, block_size);
    return format("AQUA-KV v%u: %u-point grid (layer 0: %u) in R^%u, group %u, C = %u, %s predictors (values from %s), "
                  "%u sink + %u recent f16 tokens, cache %s",
                  version, grid_size, grid0_size, grid_dim, group_size, n_channels, form.c_str(),
                  values_from_keys ? "[k_l, k_l-1]" : "[k_l, v_l-1]",
                  prefix_tokens, recent_tokens, enabled ? "on" : "off (aquakv.enabled / AQUAKV_ENABLED)");
}

aquakv_model_data * aquakv_load_model_data(llama_model_base & model) {
    llama_model_loader & ml = *model.ml;
    uint32_t version = 0;
    if (!ml.get_key(std::string("aquakv.version"), version, false)) {
        if (ml.get_tensor_meta("aquakv.grid") != nullptr) {
            throw std::runtime_error("aquakv: the file has AQUA-KV tensors but no aquakv.version metadata");
        }
        return nullptr;
    }
    if (version != 1) {
        throw std::runtime_error(format("aquakv: unsupported aquakv.version %u (this build reads version 1)", version));
    }

    auto data = std::make_unique<aquakv_model_data>();
    data->version       = version;
    data->grid_dim      = get_u32(ml, "aquakv.grid.dim");
    data->grid_size     = get_u32(ml, "aquakv.grid.size");
    data->grid0_size    = get_u32(ml, "aquakv.grid0.size");
    data->group_size    = get_u32(ml, "aquakv.group_size");
    data->prefix_tokens = get_u32(ml, "aquakv.prefix_tokens");
    data->recent_tokens = get_u32(ml, "aquakv.recent_tokens");

    // --override-kv aquakv.enabled=bool:false turns the cache off (the tensors still load);
    // AQUAKV_ENABLED=0/1 in the environment wins, for tools without --override-kv (llama-bench)
    bool enabled = true;
    if (auto it = ml.kv_overrides.find("aquakv.enabled"); it != ml.kv_overrides.end()) {
        if (it->second.tag != LLAMA_KV_OVERRIDE_TYPE_BOOL) {
            throw std::runtime_error("aquakv: --override-kv aquakv.enabled must be a bool (aquakv.enabled=bool:false)");
        }
        enabled = it->second.val_bool;
    } else if (const int64_t id = gguf_find_key(ml.metadata, "aquakv.enabled"); id >= 0) {
        if (gguf_get_kv_type(ml.metadata, id) != GGUF_TYPE_BOOL) {
            throw std::runtime_error("aquakv: the file's aquakv.enabled is not a bool");
        }
        enabled = gguf_get_val_bool(ml.metadata, id);
    }
    if (const char * env = std::getenv("AQUAKV_ENABLED")) {
        const std::string v(env);
        if (v == "0" || v == "false" || v == "off") {
            enabled = false;
        } else if (v == "1" || v == "true" || v == "on") {
            enabled = true;
        } else if (!v.empty()) {
            throw std::runtime_error("aquakv: AQUAKV_ENABLED must be 0/1, true/false or on/off, got '" + v + "'");
        }
    }
    data->enabled = enabled;

    const auto & hp = model.hparams;
    const uint32_t n_layer = hp.n_layer();
    const uint32_t C = hp.n_embd_k_gqa(0);
    for (uint32_t il = 0; il < n_layer; ++il) {
        if (hp.n_embd_k_gqa(il) != C || hp.n_embd_v_gqa(il) != C) {
            throw std::runtime_error(format("aquakv: layer %u has K/V widths %u/%u, but AQUA-KV needs the same width "
                                            "%u for keys and values in every layer", il, hp.n_embd_k_gqa(il),
                                            hp.n_embd_v_gqa(il), C));
        }
    }
    data->n_channels = C;
    uint32_t block = 0;
    data->block_size = ml.get_key(std::string("aquakv.predictor.block_size"), block, false) && block != 0 ? block : C;
    if (C % data->block_size != 0) {
        throw std::runtime_error(format("aquakv: aquakv.predictor.block_size %u does not divide C = %u", data->block_size, C));
    }
    std::string value_input = "v_prev";
    ml.get_key(std::string("aquakv.predictor.value_input"), value_input, false);
    if (value_input == "k_prev") {
        data->values_from_keys = true;
    } else if (value_input != "v_prev") {
        throw std::runtime_error("aquakv: unknown aquakv.predictor.value_input '" + value_input +
                                 "' (this build reads v_prev and k_prev)");
    }
    std::string form = "dense";
    ml.get_key(std::string("aquakv.predictor.form"), form, false);
    if (form == "lowrank") {
        data->predictor = AQUAKV_PREDICTOR_LOWRANK;
        data->rank_k = get_u32(ml, "aquakv.predictor.rank_k");
        data->rank_v = get_u32(ml, "aquakv.predictor.rank_v");
        if (data->rank_k == 0 || data->rank_k > C || data->rank_v == 0 || data->rank_v > C) {
            throw std::runtime_error(format("aquakv: predictor ranks %u/%u must lie in 1..C = %u", data->rank_k,
                                            data->rank_v, C));
        }
        if (data->block_size != C) {
            throw std::runtime_error("aquakv: low-rank predictors cannot also be block-diagonal (aquakv.predictor.block_size)");
        }
    } else if (form != "dense") {
        throw std::runtime_error("aquakv: unknown aquakv.predictor.form '" + form + "' (this build reads dense and lowrank)");
    }
    if (data->grid_dim == 0 || C % data->grid_dim != 0 || !is_power_of_two(data->group_size) ||
        C % data->group_size != 0 || data->group_size % data->grid_dim != 0 ||
        !is_power_of_two(data->grid_size) || !is_power_of_two(data->grid0_size)) {
        throw std::runtime_error(format("aquakv: inconsistent metadata: C = %u, grid dim %u, group size %u, grid sizes "
                                        "%u/%u (group size and grid sizes must be powers of two dividing C)",
                                        C, data->grid_dim, data->group_size, data->grid_size, data->grid0_size));
    }

    const auto & tn = model.tn;
    const int64_t d = data->grid_dim;
    data->grid  = model.create_tensor(tn(LLM_TENSOR_AQUAKV_GRID),  {d, (int64_t) data->grid_size},  0);
    data->grid0 = model.create_tensor(tn(LLM_TENSOR_AQUAKV_GRID0), {d, (int64_t) data->grid0_size}, 0);
    data->layers.resize(n_layer);
    for (uint32_t il = 1; il < n_layer; ++il) {
        auto & L = data->layers[il];
        const int bid = (int) il;
        L.k_pred_b   = model.create_tensor(tn(LLM_TENSOR_AQUAKV_K_PRED,   "bias",   bid), {C},    0);
        L.v_pred_b   = model.create_tensor(tn(LLM_TENSOR_AQUAKV_V_PRED,   "bias",   bid), {C},    0);
        if (data->predictor == AQUAKV_PREDICTOR_LOWRANK) {
            const int64_t rk = data->rank_k;
            const int64_t rv = data->rank_v;
            L.k_down   = model.create_tensor(tn(LLM_TENSOR_AQUAKV_K_PRED_DOWN,   "weight", bid), {C, rk}, 0);
            L.k_up     = model.create_tensor(tn(LLM_TENSOR_AQUAKV_K_PRED_UP,     "weight", bid), {rk, C}, 0);
            L.v_down_k = model.create_tensor(tn(LLM_TENSOR_AQUAKV_V_PRED_K_DOWN, "weight", bid), {C, rv}, 0);
            L.v_down_v = model.create_tensor(tn(LLM_TENSOR_AQUAKV_V_PRED_V_DOWN, "weight", bid), {C, rv}, 0);
            L.v_up     = model.create_tensor(tn(LLM_TENSOR_AQUAKV_V_PRED_UP,     "weight", bid), {rv, C}, 0);
            continue;
        }
        L.k_pred_w   = model.create_tensor(tn(LLM_TENSOR_AQUAKV_K_PRED,   "weight", bid), {C, C}, 0);
        L.v_pred_k_w = model.create_tensor(tn(LLM_TENSOR_AQUAKV_V_PRED_K, "weight", bid), {C, C}, 0);
        L.v_pred_v_w = model.create_tensor(tn(LLM_TENSOR_AQUAKV_V_PRED_V, "weight", bid), {C, C}, 0);
    }
    LLAMA_LOG_INFO("%s: %s\n", __func__, data->describe().c_str());
    return data.release();
}
