// aquakv-gguf: the entry points that the hook patches (native/patches/0004-*) call from
// llama.cpp's own files. Forward declarations only, so that changing our implementation never
// recompiles upstream sources.
#pragma once

#include <cstdint>

struct ggml_tensor;
struct llama_cparams;
struct llama_memory_params;
struct llm_graph_context;
struct llama_model;
class  llm_graph_input_attn_kv;
struct llama_memory_i;

// llama_model::create_memory: the AQUA-KV cache when the model carries enabled AQUA-KV data,
// nullptr otherwise (the model then gets its usual memory). Throws std::runtime_error naming the
// reason for an unsupported combination (SWA, recurrent/hybrid, MLA, M-RoPE, a cache type flag).
llama_memory_i * aquakv_create_memory(const llama_model & model, const llama_memory_params & params,
                                      const llama_cparams & cparams);

// llm_graph_context::build_attn_inp_kv: attaches the AQUA-KV inputs when the memory is AQUA-KV.
void aquakv_graph_add_inputs(const llm_graph_context & gctx, llm_graph_input_attn_kv & inp);

// llm_graph_context::build_attn for inputs with AQUA-KV attached: store, reconstruct, attend.
ggml_tensor * aquakv_build_attn(const llm_graph_context & gctx, llm_graph_input_attn_kv * inp,
                                ggml_tensor * wo, ggml_tensor * wo_b, ggml_tensor * wo_s,
                                ggml_tensor * q_cur, ggml_tensor * k_cur, ggml_tensor * v_cur,
                                ggml_tensor * kq_b, ggml_tensor * sinks, float kq_scale, int il);

// llama_context::graph_max_nodes: extra graph nodes (and tensor objects) the AQUA-KV store/read
// graph needs beyond the architecture's own; 0 unless the model's AQUA-KV cache is enabled.
uint32_t aquakv_graph_extra_nodes(const llama_model & model);
