// aquakv-gguf: the AQUA-KV memory for llama.cpp (DESIGN §3, §5).
//
// Composition, as the pinned tree's MSA cache does it: a llama_kv_cache `codes` owns the cells,
// slot search, masks, sequence bookkeeping and the packed rows. Its hparams are rewritten so
// that each layer's "K" and "V" rows are I8 rows of exactly the AQUA-KV row size (codes + f16
// group scales), and its RoPE type is NONE: keys are stored before RoPE, so a K-shift is a
// position update and nothing else. This class adds the f16 window (sinks and recent tokens) in
// a small slot store per stream, the policy that decides which cells get quantized when, and the
// per-ubatch plan (index lists) that the graph (native/src/aquakv-graph.cpp) consumes.
#pragma once

#include "aquakv-model.h"

#include "llama-hparams.h"
#include "llama-kv-cache.h"
#include "llama-memory.h"

#include "ggml-cpp.h"

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

// Index lists for one ubatch, shared by every layer. Rows are "flat": stream-major over the whole
// storage (s*kv_size + cell for codes, s*n_win + slot for the window) or over the attended cells
// (s_rel*n_kv + cell, s_rel = s - s0) for the reconstructed K̂/V̂ of the graph.
struct aquakv_plan {
    uint32_t s0   = 0;  // first stream of the ubatch
    uint32_t ns   = 1;  // streams s0 .. s0+ns-1
    uint32_t n_kv = 0;  // attended cells per stream

    // rows to encode: source row in concat(window [C, n_win*n_stream], new tokens [C, n_tokens])
    std::vector<int32_t> enc_src;
    std::vector<int32_t> enc_dst;   // flat codes row
    std::vector<int32_t> enc_prev;  // attended-cell row (previous layer's reconstruction)

    // new tokens that enter the f16 window: token index -> flat window slot
    std::vector<int32_t> wnew_src;
    std::vector<int32_t> wnew_dst;

    // window rows that replace reconstructions: flat slot -> attended-cell row
    std::vector<int32_t> wread_src;
    std::vector<int32_t> wread_dst;

    std::vector<int32_t> kv_pos;  // [ns*n_kv] position of each attended cell (0 when empty), for RoPE
};

class llama_kv_cache_aqua : public llama_memory_i {
public:
    llama_kv_cache_aqua(const llama_model & model, const aquakv_model_data & data, bool offload, bool unified,
                        uint32_t kv_size, uint32_t n_seq_max);

    ~llama_kv_cache_aqua() override = default;

    // llama_memory_i

    llama_memory_context_ptr init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) override;
    llama_memory_context_ptr init_full() override;
    llama_memory_context_ptr init_update(llama_context * lctx, bool optimize) override;

    bool get_can_shift() const override { return true; }

    void clear(bool data) override;

    bool seq_rm  (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1) override;
    void seq_cp  (llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) override;
    void seq_keep(llama_seq_id seq_id)                                                          override;
    void seq_add (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, llama_pos shift) override;
    void seq_div (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, int d) override;

    llama_pos seq_pos_min(llama_seq_id seq_id) const override;
    llama_pos seq_pos_max(llama_seq_id seq_id) const override;

    std::map<ggml_backend_buffer_type_t, size_t> memory_breakdown() const override;

    void state_write(llama_io_write_i & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) const override;
    void state_read (llama_io_read_i  & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) override;

    // AQUA-KV specific

    const aquakv_model_data & data() const { return md; }
    llama_kv_cache * codes() const { return kv_codes.get(); }

    uint32_t get_size()     const { return kv_size; }
    uint32_t get_n_stream() const { return n_stream; }
    uint32_t get_n_win()    const { return n_win; }

    ggml_tensor * win_k(int32_t il) const { return layers.at(il).win_k; }  // F16 [C, n_win, n_stream]
    ggml_tensor * win_v(int32_t il) const { return layers.at(il).win_v; }

    // the plan for the ubatch that was just placed in the cells; commits the window slot changes
    void plan_ubatch(const llama_kv_cache::slot_info & sinfo, const llama_ubatch & ubatch, uint32_t n_kv,
                     aquakv_plan & out);

    // a plan with worst-case list sizes for reserving compute buffers (indices all valid)
    void plan_reserve(uint32_t n_tokens, aquakv_plan & out) const;

    // bytes of codes + scales, of the f16 window, and bits per value at the cache's capacity
    size_t bytes_codes()  const;
    size_t bytes_window() const;

    // queued by seq_cp across streams, performed with the codes' own stream copies
    void apply_window_copies();
    bool has_window_copies() const { return !wcopy_src.empty(); }

private:
    struct layer_store {
        ggml_tensor * win_k = nullptr;
        ggml_tensor * win_v = nullptr;
    };

    // a slot whose cell no longer holds a token is free again
    void release_stale_slots(uint32_t strm);

    const llama_kv_cells & cells_of_stream(uint32_t strm) const;

    const llama_model & model;
    const aquakv_model_data & md;

    llama_hparams hparams_codes;  // llama_kv_cache keeps a reference: it must outlive kv_codes
    std::unique_ptr<llama_kv_cache> kv_codes;

    uint32_t kv_size  = 0;
    uint32_t n_stream = 1;
    uint32_t n_win    = 0;  // window slots per stream

    std::vector<layer_store> layers;
    std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> ctxs_bufs;
    std::map<ggml_backend_buffer_type_t, size_t> window_need;  // window bytes per buffer type

    // per stream: window slot of each cell (-1: none, i.e. quantized when the cell is used) and its inverse
    std::vector<std::vector<int32_t>> slot_of_cell;
    std::vector<std::vector<int32_t>> cell_of_slot;

    std::vector<uint32_t> wcopy_src;
    std::vector<uint32_t> wcopy_dst;
};

class llama_kv_cache_aqua_context : public llama_kv_cache_context {
public:
    // the worst-case context (graph reservation)
    explicit llama_kv_cache_aqua_context(llama_kv_cache_aqua * aq);

    // a batch-processing context
    llama_kv_cache_aqua_context(llama_kv_cache_aqua * aq, slot_info_vec_t sinfos, std::vector<llama_ubatch> ubatches);

    bool next()  override;
    bool apply() override;

    llama_kv_cache_aqua * cache() const { return aq; }

    // the current ubatch's plan; nullptr for the worst-case context
    const aquakv_plan * plan() const { return has_plan ? &cur_plan : nullptr; }

private:
    llama_kv_cache_aqua * aq;

    slot_info_vec_t           sinfos_copy;
    std::vector<llama_ubatch> ubatches_copy;
    size_t                    i_cur = 0;

    bool        has_plan = false;
    aquakv_plan cur_plan;
};
