// aquakv-gguf: the AQUA-KV memory (see native/include/aquakv-cache.h for the design).

#include "aquakv-cache.h"
#include "aquakv-hooks.h"
#include "aquakv-ops.h"

#include "llama-arch.h"
#include "llama-batch.h"
#include "llama-cparams.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-model.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <stdexcept>

namespace {

// State section written after the codes cache's own state: a tag and a version, so that a state
// from another cache type or layout is refused with a clear message instead of misread.
constexpr uint32_t AQUAKV_STATE_MAGIC   = 0x564b5141;  // "AQKV"
constexpr uint32_t AQUAKV_STATE_VERSION = 1;

size_t row_bytes_of(const aquakv_model_data & md, uint32_t il) {
    aquakv_row_layout l;
    const uint32_t n_points = il == 0 ? md.grid0_size : md.grid_size;
    if (!aquakv_make_layout(md.n_channels, md.group_size, md.grid_dim, n_points, &l)) {
        throw std::runtime_error(format("aquakv: no valid row layout for C = %u, group %u, grid %u x %u",
                                        md.n_channels, md.group_size, n_points, md.grid_dim));
    }
    return l.row_bytes;
}

// an update context that also copies the f16 window of streams copied by seq_cp
class aquakv_update_context : public llama_memory_context_i {
public:
    aquakv_update_context(llama_kv_cache_aqua * aq, llama_memory_context_ptr base) : aq(aq), base(std::move(base)) {}

    bool next() override { return base->next(); }

    bool apply() override {
        bool ok = true;
        if (base->get_status() == LLAMA_MEMORY_STATUS_SUCCESS) {
            ok = base->apply();
        }
        aq->apply_window_copies();
        return ok;
    }

    llama_memory_status get_status() const override {
        const auto st = base->get_status();
        if (st == LLAMA_MEMORY_STATUS_NO_UPDATE && aq->has_window_copies()) {
            return LLAMA_MEMORY_STATUS_SUCCESS;
        }
        return st;
    }

    const llama_ubatch & get_ubatch() const override { return base->get_ubatch(); }

private:
    llama_kv_cache_aqua * aq;
    llama_memory_context_ptr base;
};

} // namespace

//
// llama_kv_cache_aqua
//

llama_kv_cache_aqua::llama_kv_cache_aqua(const llama_model & model, const aquakv_model_data & data, bool offload,
                                         bool unified, uint32_t kv_size, uint32_t n_seq_max) :
    model(model), md(data), hparams_codes(model.hparams), kv_size(kv_size), n_stream(unified ? 1 : n_seq_max) {
    const uint32_t n_layer = model.hparams.n_layer();
    const uint32_t C = md.n_channels;

    // each layer's K and V rows become I8 rows of the packed AQUA-KV size
    hparams_codes.n_embd_head_k_full = 1;
    hparams_codes.n_embd_head_v_full = 1;
    for (uint32_t il = 0; il < n_layer; ++il) {
        hparams_codes.n_head_kv_arr[il] = (uint32_t) row_bytes_of(md, il);
    }
    hparams_codes.rope_type = LLAMA_ROPE_TYPE_NONE;  // pre-RoPE storage: a K-shift only moves positions

    kv_codes = std::make_unique<llama_kv_cache>(
            model, hparams_codes, GGML_TYPE_I8, GGML_TYPE_I8,
            /*v_trans*/ false, offload, unified, kv_size, n_seq_max, /*n_pad*/ 1,
            /*n_swa*/ 0, LLAMA_SWA_TYPE_NONE, nullptr, nullptr, nullptr, nullptr, "aquakv_");

    // f16 window: every sequence of a stream holds at most P sinks and W-1 recent tokens
    const uint32_t seqs_per_stream = unified ? n_seq_max : 1;
    n_win = std::max<uint32_t>(1, seqs_per_stream*(md.prefix_tokens + md.recent_tokens - 1));

    struct buft_cmp {
        bool operator()(ggml_backend_buffer_type_t a, ggml_backend_buffer_type_t b) const {
            return strcmp(ggml_backend_buft_name(a), ggml_backend_buft_name(b)) < 0;
        }
    };
    std::map<ggml_backend_buffer_type_t, ggml_context *, buft_cmp> ctx_map;
    auto ctx_for = [&](ggml_backend_buffer_type_t buft) {
        auto it = ctx_map.find(buft);
        if (it != ctx_map.end()) {
            return it->second;
        }
        ggml_init_params params = { size_t(2u*n_layer*ggml_tensor_overhead()), nullptr, true };
        ggml_context * ctx = ggml_init(params);
        if (!ctx) {
            throw std::runtime_error("aquakv: failed to create a ggml context for the window");
        }
        ctxs_bufs.emplace_back(ggml_context_ptr(ctx), nullptr);
        ctx_map[buft] = ctx;
        return ctx;
    };

    layers.resize(n_layer);
    for (uint32_t il = 0; il < n_layer; ++il) {
        ggml_backend_buffer_type_t buft = ggml_backend_cpu_buffer_type();
        if (offload) {
            buft = ggml_backend_dev_buffer_type(model.dev_layer(il));
        }
        ggml_context * ctx = ctx_for(buft);
        layers[il].win_k = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, C, n_win, n_stream);
        layers[il].win_v = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, C, n_win, n_stream);
        ggml_format_name(layers[il].win_k, "aquakv_win_k_l%u", il);
        ggml_format_name(layers[il].win_v, "aquakv_win_v_l%u", il);
    }

    for (auto & [ctx, buf] : ctxs_bufs) {
        ggml_backend_buffer_type_t buft = nullptr;
        for (const auto & [b, c] : ctx_map) {
            if (c == ctx.get()) {
                buft = b;
            }
        }
        ggml_backend_buffer_t b;
        if (model.hparams.no_alloc) {
            b = ggml_backend_buft_alloc_buffer(buft, 0);
            for (ggml_tensor * t = ggml_get_first_tensor(ctx.get()); t; t = ggml_get_next_tensor(ctx.get(), t)) {
                t->buffer = b;
            }
        } else {
            b = ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), buft);
        }
        if (!b) {
            throw std::runtime_error("aquakv: failed to allocate the f16 window buffer");
        }
        ggml_backend_buffer_clear(b, 0);
        buf.reset(b);
        size_t need = 0;  // what the window takes even when no_alloc only simulates the allocation
        for (ggml_tensor * t = ggml_get_first_tensor(ctx.get()); t; t = ggml_get_next_tensor(ctx.get(), t)) {
            need += ggml_backend_buft_get_alloc_size(buft, t);
        }
        window_need[buft] += need;
    }

    slot_of_cell.assign(n_stream, std::vector<int32_t>(kv_size, -1));
    cell_of_slot.assign(n_stream, std::vector<int32_t>(n_win, -1));

    const double n_values = 2.0*n_layer*C*(double) kv_size*n_stream;
    LLAMA_LOG_INFO("%s: AQUA-KV cache: %u cells x %u streams, %u layers, C = %u: codes+scales %.2f MiB, "
                   "f16 window %.2f MiB (%u slots/stream), %.3f bits/value at capacity; "
                   "scratch: f32 reconstructions of 2 layers in the compute buffer (~%.2f MiB)\n",
                   __func__, kv_size, n_stream, n_layer, C, bytes_codes()/1048576.0, bytes_window()/1048576.0,
                   n_win, 8.0*(bytes_codes() + bytes_window())/n_values,
                   4.0*4.0*C*(double) kv_size*n_stream/1048576.0);
}

size_t llama_kv_cache_aqua::bytes_codes() const {
    size_t total = 0;
    for (uint32_t il = 0; il < layers.size(); ++il) {
        total += 2*row_bytes_of(md, il)*(size_t) kv_size*n_stream;
    }
    return total;
}

size_t llama_kv_cache_aqua::bytes_window() const {
    return 2*layers.size()*sizeof(ggml_fp16_t)*(size_t) md.n_channels*n_win*n_stream;
}

llama_memory_context_ptr llama_kv_cache_aqua::init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) {
    GGML_UNUSED(embd_all);

    do {
        balloc.split_reset();

        std::vector<llama_ubatch> ubatches;
        while (true) {
            auto ubatch = n_stream == 1 ? balloc.split_simple(n_ubatch) : balloc.split_equal(n_ubatch, true, 0);
            if (ubatch.n_tokens == 0) {
                break;
            }
            ubatches.push_back(std::move(ubatch));
        }

        if (balloc.get_n_used() < balloc.get_n_tokens()) {
            break;
        }

        auto sinfos = kv_codes->prepare(ubatches);
        if (sinfos.empty()) {
            break;
        }

        return std::make_unique<llama_kv_cache_aqua_context>(this, std::move(sinfos), std::move(ubatches));
    } while (false);

    return std::make_unique<llama_kv_cache_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
}

llama_memory_context_ptr llama_kv_cache_aqua::init_full() {
    return std::make_unique<llama_kv_cache_aqua_context>(this);
}

llama_memory_context_ptr llama_kv_cache_aqua::init_update(llama_context * lctx, bool optimize) {
    return std::make_unique<aquakv_update_context>(this, kv_codes->init_update(lctx, optimize));
}

void llama_kv_cache_aqua::clear(bool data) {
    kv_codes->clear(data);
    for (uint32_t s = 0; s < n_stream; ++s) {
        std::fill(slot_of_cell[s].begin(), slot_of_cell[s].end(), -1);
        std::fill(cell_of_slot[s].begin(), cell_of_slot[s].end(), -1);
    }
    wcopy_src.clear();
    wcopy_dst.clear();
    if (data) {
        for (auto & [ctx, buf] : ctxs_bufs) {
            ggml_backend_buffer_clear(buf.get(), 0);
        }
    }
}

const llama_kv_cells & llama_kv_cache_aqua::cells_of_stream(uint32_t strm) const {
    // with several streams, sequence s lives in stream s; with one, every sequence is in stream 0
    return kv_codes->get_cells(n_stream == 1 ? 0 : (llama_seq_id) strm);
}

void llama_kv_cache_aqua::release_stale_slots(uint32_t strm) {
    const llama_kv_cells * cells = &cells_of_stream(strm);
    for (uint32_t slot = 0; slot < n_win; ++slot) {
        const int32_t cell = cell_of_slot[strm][slot];
        if (cell >= 0 && cells->is_empty(cell)) {
            cell_of_slot[strm][slot] = -1;
            slot_of_cell[strm][cell] = -1;
        }
    }
}

bool llama_kv_cache_aqua::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    const bool res = kv_codes->seq_rm(seq_id, p0, p1);
    for (uint32_t s = 0; s < n_stream; ++s) {
        release_stale_slots(s);
    }
    return res;
}

void llama_kv_cache_aqua::seq_cp(llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) {
    const uint32_t ssrc = kv_codes->get_stream(seq_id_src);
    const uint32_t sdst = kv_codes->get_stream(seq_id_dst);
    kv_codes->seq_cp(seq_id_src, seq_id_dst, p0, p1);
    if (ssrc != sdst) {
        // the codes cache copied the source stream's cells of seq_id_src to the same cell indices
        // and queued a copy of the whole stream buffer: mirror both for the window
        slot_of_cell[sdst] = slot_of_cell[ssrc];
        cell_of_slot[sdst] = cell_of_slot[ssrc];
        release_stale_slots(sdst);
        wcopy_src.push_back(ssrc);
        wcopy_dst.push_back(sdst);
    }
}

void llama_kv_cache_aqua::apply_window_copies() {
    for (size_t i = 0; i < wcopy_src.size(); ++i) {
        for (auto & L : layers) {
            for (ggml_tensor * t : { L.win_k, L.win_v }) {
                const size_t plane = t->nb[2];
                std::vector<uint8_t> tmp(plane);
                ggml_backend_tensor_get(t, tmp.data(), wcopy_src[i]*plane, plane);
                ggml_backend_tensor_set(t, tmp.data(), wcopy_dst[i]*plane, plane);
            }
        }
    }
    wcopy_src.clear();
    wcopy_dst.clear();
}

void llama_kv_cache_aqua::seq_keep(llama_seq_id seq_id) {
    kv_codes->seq_keep(seq_id);
    for (uint32_t s = 0; s < n_stream; ++s) {
        release_stale_slots(s);
    }
}

void llama_kv_cache_aqua::seq_add(llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift) {
    // keys are stored before RoPE: moving positions is the whole K-shift
    kv_codes->seq_add(seq_id, p0, p1, shift);
    for (uint32_t s = 0; s < n_stream; ++s) {
        release_stale_slots(s);  // a negative shift can push tokens out of the cache
    }
}

void llama_kv_cache_aqua::seq_div(llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    kv_codes->seq_div(seq_id, p0, p1, d);
}

llama_pos llama_kv_cache_aqua::seq_pos_min(llama_seq_id seq_id) const {
    return kv_codes->seq_pos_min(seq_id);
}

llama_pos llama_kv_cache_aqua::seq_pos_max(llama_seq_id seq_id) const {
    return kv_codes->seq_pos_max(seq_id);
}

std::map<ggml_backend_buffer_type_t, size_t> llama_kv_cache_aqua::memory_breakdown() const {
    auto mb = kv_codes->memory_breakdown();
    for (const auto & [buft, size] : window_need) {
        mb[buft] += size;
    }
    return mb;
}

void llama_kv_cache_aqua::plan_reserve(uint32_t n_tokens, aquakv_plan & out) const {
    out = aquakv_plan();
    out.s0   = 0;
    out.ns   = n_stream;
    out.n_kv = kv_size;
    out.enc_src .assign(n_tokens, 0);
    out.enc_dst .assign(n_tokens, 0);
    out.enc_prev.assign(n_tokens, 0);
    const uint32_t n_new_win = std::min(n_tokens, n_win*n_stream);
    out.wnew_src.assign(n_new_win, 0);
    out.wnew_dst.assign(n_new_win, 0);
    out.wread_src.assign(n_win*n_stream, 0);
    out.wread_dst.assign(n_win*n_stream, 0);
    out.kv_pos.assign((size_t) kv_size*n_stream, 0);
}

void llama_kv_cache_aqua::plan_ubatch(const llama_kv_cache::slot_info & sinfo, const llama_ubatch & ubatch,
                                      uint32_t n_kv, aquakv_plan & out) {
    out = aquakv_plan();
    out.s0   = sinfo.s0;
    out.ns   = sinfo.s1 - sinfo.s0 + 1;
    out.n_kv = n_kv;

    const llama_pos P = (llama_pos) md.prefix_tokens;
    const size_t    W = md.recent_tokens;
    const int32_t new_base = (int32_t) (n_win*n_stream);  // first new-token row of the encoder's source

    for (uint32_t sr = 0; sr < sinfo.n_stream(); ++sr) {
        const uint32_t strm = sinfo.strm[sr];
        release_stale_slots(strm);
    }

    for (uint32_t sr = 0; sr < sinfo.n_stream(); ++sr) {
        const uint32_t strm = sinfo.strm[sr];
        const llama_kv_cells * cells = &cells_of_stream(strm);

        // new tokens of this stream: cell -> token index
        std::vector<std::pair<uint32_t, int32_t>> fresh;
        for (uint32_t i = 0; i < sinfo.size(); ++i) {
            const uint32_t cell = sinfo.idxs[sr][i];
            const int32_t  t    = (int32_t) (sr*sinfo.size() + i);
            if (slot_of_cell[strm][cell] >= 0) {  // a reused cell gives up its old window slot
                cell_of_slot[strm][slot_of_cell[strm][cell]] = -1;
                slot_of_cell[strm][cell] = -1;
            }
            fresh.emplace_back(cell, t);
        }

        // which cells complete a chunk: per sequence, its unquantized non-sink cells in position order
        std::vector<char> quantize(kv_size, 0);
        for (uint32_t iu = 0; iu < ubatch.n_seqs_unq; ++iu) {
            const llama_seq_id seq = ubatch.seq_id_unq[iu];
            if (kv_codes->get_stream(seq) != strm) {
                continue;
            }
            std::vector<std::pair<llama_pos, uint32_t>> cand;
            for (uint32_t slot = 0; slot < n_win; ++slot) {
                const int32_t cell = cell_of_slot[strm][slot];
                if (cell >= 0 && cells->seq_has(cell, seq) && cells->pos_get(cell) >= P) {
                    cand.emplace_back(cells->pos_get(cell), (uint32_t) cell);
                }
            }
            for (const auto & [cell, t] : fresh) {
                if (cells->seq_has(cell, seq) && cells->pos_get(cell) >= P) {
                    cand.emplace_back(cells->pos_get(cell), cell);
                }
            }
            std::sort(cand.begin(), cand.end());
            const size_t n_q = (cand.size()/W)*W;
            for (size_t i = 0; i < n_q; ++i) {
                quantize[cand[i].second] = 1;
            }
        }

        auto add_enc = [&](uint32_t cell, int32_t src) {
            out.enc_src .push_back(src);
            out.enc_dst .push_back((int32_t) (strm*kv_size + cell));
            out.enc_prev.push_back((int32_t) ((strm - out.s0)*n_kv + cell));
        };

        // flush: old window cells first (their slots become free), then new tokens
        for (uint32_t slot = 0; slot < n_win; ++slot) {
            const int32_t cell = cell_of_slot[strm][slot];
            if (cell >= 0 && quantize[cell]) {
                add_enc((uint32_t) cell, (int32_t) (strm*n_win + slot));
                cell_of_slot[strm][slot] = -1;
                slot_of_cell[strm][cell] = -1;
            }
        }
        uint32_t next_free = 0;
        for (const auto & [cell, t] : fresh) {
            if (quantize[cell]) {
                add_enc(cell, new_base + t);
                continue;
            }
            while (next_free < n_win && cell_of_slot[strm][next_free] >= 0) {
                ++next_free;
            }
            if (next_free == n_win) {
                // more unquantized tokens than the window holds (unusual batches): quantize now
                add_enc(cell, new_base + t);
                continue;
            }
            cell_of_slot[strm][next_free] = (int32_t) cell;
            slot_of_cell[strm][cell] = (int32_t) next_free;
            out.wnew_src.push_back(t);
            out.wnew_dst.push_back((int32_t) (strm*n_win + next_free));
        }
    }

    // every window row of the attended streams replaces its cell's reconstruction
    out.kv_pos.assign((size_t) out.ns*n_kv, 0);
    for (uint32_t sr = 0; sr < out.ns; ++sr) {
        const uint32_t strm = out.s0 + sr;
        for (uint32_t slot = 0; slot < n_win; ++slot) {
            const int32_t cell = cell_of_slot[strm][slot];
            if (cell >= 0 && (uint32_t) cell < n_kv) {
                out.wread_src.push_back((int32_t) (strm*n_win + slot));
                out.wread_dst.push_back((int32_t) (sr*n_kv + cell));
            }
        }
    }
    // a fixed length keeps the graph's shapes from one token to the next, so llama.cpp reuses it;
    // repeating a (slot, cell) pair writes the same row again
    if (!out.wread_src.empty()) {
        out.wread_src.resize((size_t) n_win*out.ns, out.wread_src[0]);
        out.wread_dst.resize((size_t) n_win*out.ns, out.wread_dst[0]);
    }
    for (uint32_t sr = 0; sr < out.ns; ++sr) {
        const uint32_t strm = out.s0 + sr;
        const llama_kv_cells * cells = &cells_of_stream(strm);
        for (uint32_t cell = 0; cell < n_kv && cell < cells->size(); ++cell) {
            if (!cells->is_empty(cell)) {
                out.kv_pos[(size_t) (strm - out.s0)*n_kv + cell] = cells->pos_get(cell);
            }
        }
    }
}

//
// state: the codes cache's own state, then our section
//   magic, version, C, n_win, n_layer, then per stream: n_cells written by the codes cache,
//   n_window, and for each window cell its index in the codes cache's cell order followed by
//   its K and V rows (f16, C each) for every layer
//

void llama_kv_cache_aqua::state_write(llama_io_write_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) const {
    kv_codes->state_write(io, seq_id, flags);

    const uint32_t C = md.n_channels;
    const uint32_t n_layer = (uint32_t) layers.size();
    io.write(&AQUAKV_STATE_MAGIC, sizeof(uint32_t));
    io.write(&AQUAKV_STATE_VERSION, sizeof(uint32_t));
    io.write(&C, sizeof(C));
    io.write(&n_layer, sizeof(n_layer));
    io.write(&n_stream, sizeof(n_stream));

    for (uint32_t s = 0; s < n_stream; ++s) {
        // the same cell selection and order as llama_kv_cache::state_write (no SWA here)
        const llama_kv_cells * cells = &cells_of_stream(s);
        std::vector<std::pair<uint32_t, uint32_t>> win;  // (order index, slot)
        uint32_t n_written = 0;
        if (cells) {
            for (uint32_t i = 0; i < cells->size(); ++i) {
                if (cells->is_empty(i) || (seq_id != -1 && !cells->seq_has(i, seq_id))) {
                    continue;
                }
                if (slot_of_cell[s][i] >= 0) {
                    win.emplace_back(n_written, (uint32_t) slot_of_cell[s][i]);
                }
                ++n_written;
            }
        }
        const uint32_t n_win_rows = (uint32_t) win.size();
        io.write(&n_written, sizeof(n_written));
        io.write(&n_win_rows, sizeof(n_win_rows));
        const size_t row = sizeof(ggml_fp16_t)*C;
        for (const auto & [order, slot] : win) {
            io.write(&order, sizeof(order));
            for (const auto & L : layers) {
                io.write_tensor(L.win_k, ((size_t) s*n_win + slot)*row, row);
                io.write_tensor(L.win_v, ((size_t) s*n_win + slot)*row, row);
            }
        }
    }
}

void llama_kv_cache_aqua::state_read(llama_io_read_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) {
    llama_kv_cache::slot_info_vec_t sinfos;
    kv_codes->state_read_sinfo(io, seq_id, flags, &sinfos, nullptr);

    auto fail = [&](const std::string & msg) {
        kv_codes->state_clear(seq_id);
        throw std::runtime_error("aquakv: cannot restore the AQUA-KV cache state: " + msg);
    };

    uint32_t magic = 0, version = 0, C = 0, n_layer = 0, ns = 0;
    io.read(&magic, sizeof(magic));
    if (magic != AQUAKV_STATE_MAGIC) {
        fail("the state was not written by an AQUA-KV cache");
    }
    io.read(&version, sizeof(version));
    if (version != AQUAKV_STATE_VERSION) {
        fail(format("state version %u, this build reads version %u", version, AQUAKV_STATE_VERSION));
    }
    io.read(&C, sizeof(C));
    io.read(&n_layer, sizeof(n_layer));
    io.read(&ns, sizeof(ns));
    if (C != md.n_channels || n_layer != layers.size() || ns != n_stream) {
        fail(format("the state is for C = %u, %u layers, %u streams; this cache has C = %u, %zu layers, %u streams",
                    C, n_layer, ns, md.n_channels, layers.size(), n_stream));
    }

    for (uint32_t s = 0; s < n_stream; ++s) {
        uint32_t n_written = 0, n_win_rows = 0;
        io.read(&n_written, sizeof(n_written));
        io.read(&n_win_rows, sizeof(n_win_rows));
        if (n_written == 0) {
            continue;
        }
        if (s >= sinfos.size() || sinfos[s].empty() || sinfos[s].idxs[0].size() != n_written) {
            fail("the window section does not match the restored cells");
        }
        const uint32_t strm = sinfos[s].strm[0];
        release_stale_slots(strm);
        const size_t row = sizeof(ggml_fp16_t)*md.n_channels;
        uint32_t next_free = 0;
        for (uint32_t w = 0; w < n_win_rows; ++w) {
            uint32_t order = 0;
            io.read(&order, sizeof(order));
            if (order >= n_written) {
                fail("a window row refers to a cell outside the state");
            }
            const uint32_t cell = sinfos[s].idxs[0][order];
            while (next_free < n_win && cell_of_slot[strm][next_free] >= 0) {
                ++next_free;
            }
            if (next_free == n_win) {
                fail("the window of the state does not fit this cache's window (fewer parallel sequences?)");
            }
            cell_of_slot[strm][next_free] = (int32_t) cell;
            slot_of_cell[strm][cell] = (int32_t) next_free;
            for (auto & L : layers) {
                io.read_tensor(L.win_k, ((size_t) strm*n_win + next_free)*row, row);
                io.read_tensor(L.win_v, ((size_t) strm*n_win + next_free)*row, row);
            }
        }
    }
}

//
// llama_kv_cache_aqua_context
//

llama_kv_cache_aqua_context::llama_kv_cache_aqua_context(llama_kv_cache_aqua * aq) :
    llama_kv_cache_context(aq->codes()), aq(aq) {}

llama_kv_cache_aqua_context::llama_kv_cache_aqua_context(llama_kv_cache_aqua * aq, slot_info_vec_t sinfos,
                                                         std::vector<llama_ubatch> ubatches) :
    llama_kv_cache_context(aq->codes(), sinfos, ubatches), aq(aq),
    sinfos_copy(std::move(sinfos)), ubatches_copy(std::move(ubatches)) {}

bool llama_kv_cache_aqua_context::next() {
    ++i_cur;
    has_plan = false;
    return llama_kv_cache_context::next();
}

bool llama_kv_cache_aqua_context::apply() {
    if (!llama_kv_cache_context::apply()) {
        return false;
    }
    if (i_cur < ubatches_copy.size()) {
        aq->plan_ubatch(sinfos_copy[i_cur], ubatches_copy[i_cur], get_n_kv(), cur_plan);
        has_plan = true;
    }
    return true;
}

//
// creation (hook in llama_model::create_memory)
//

llama_memory_i * aquakv_create_memory(const llama_model & model, const llama_memory_params & params,
                                      const llama_cparams & cparams) {
    const aquakv_model_data * md = model.aquakv.get();
    if (md == nullptr || !md->enabled) {
        return nullptr;
    }
    const auto & hp = model.hparams;
    auto refuse = [](const std::string & why) {
        throw std::runtime_error("aquakv: the AQUA-KV cache cannot be used here: " + why +
                                 " (load with --override-kv aquakv.enabled=bool:false or AQUAKV_ENABLED=0 "
                                 "for an ordinary cache)");
    };
    if (llm_arch_is_recurrent(model.arch) || llm_arch_is_hybrid(model.arch)) {
        refuse("the model is recurrent or hybrid");
    }
    if (hp.swa_type != LLAMA_SWA_TYPE_NONE || hp.is_swa_any()) {
        refuse("the model uses sliding-window attention");
    }
    if (hp.is_mla()) {
        refuse("the model uses multi-head latent attention (MLA)");
    }
    if (hp.use_mrope()) {
        refuse("the model uses M-RoPE");
    }
    if (hp.rope_type == LLAMA_ROPE_TYPE_NONE) {
        refuse("the model has no RoPE (AQUA-KV stores keys before RoPE)");
    }
    if (params.type_k != GGML_TYPE_F16 || params.type_v != GGML_TYPE_F16) {
        refuse(format("the cache type flags ask for K %s / V %s, but AQUA-KV stores its own codes; "
                      "leave --cache-type-k/-v at f16", ggml_type_name(params.type_k), ggml_type_name(params.type_v)));
    }
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        if (hp.n_embd_k_gqa(il) != md->n_channels || hp.n_embd_v_gqa(il) != md->n_channels ||
            hp.n_embd_head_k(il) != hp.n_embd_head_v(il)) {
            refuse(format("layer %u has K/V widths %u/%u, the AQUA-KV data is for C = %u", il, hp.n_embd_k_gqa(il),
                          hp.n_embd_v_gqa(il), md->n_channels));
        }
    }
    LLAMA_LOG_INFO("%s: %s\n", __func__, md->describe().c_str());
    return new llama_kv_cache_aqua(model, *md, cparams.offload_kqv, cparams.kv_unified, cparams.n_ctx_seq,
                                   cparams.n_seq_max);
}
