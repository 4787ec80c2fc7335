// aquakv-gguf: the attention graph of the AQUA-KV cache (DESIGN §3, §5).
//
// Per layer l, for keys and then values:
//   store: residual = x - prediction (from the previous layer's reconstruction, gathered at the
//          cells being encoded), encoded into packed rows; new window tokens go to the f16 window
//   read:  K̂_l = decode(codes of the attended cells) + A_l·K̂_{l-1} + a_l with the window rows
//          over their cells, in one reconstruct op; RoPE by cell position; flash (or plain)
//          attention. Low-rank predictors (A_l = U·D) multiply by D in a ggml product and by U
//          inside the reconstruct op on the CPU.
// K̂_l and V̂_l stay in the graph as the next layer's predictor input.

#include "aquakv-cache.h"
#include "aquakv-hooks.h"
#include "aquakv-ops.h"

#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-model.h"

#include "ggml-backend.h"

#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace {

class aquakv_graph_input : public llm_graph_input_i {
public:
    explicit aquakv_graph_input(const llama_kv_cache_aqua_context * mctx) : mctx(mctx) {}

    void set_input(const llama_ubatch * ubatch) override {
        GGML_UNUSED(ubatch);
        const aquakv_plan * plan = mctx->plan();
        set(enc_src,   plan ? &plan->enc_src   : nullptr);
        set(enc_dst,   plan ? &plan->enc_dst   : nullptr);
        set(enc_prev,  plan ? &plan->enc_prev  : nullptr);
        set(wnew_src,  plan ? &plan->wnew_src  : nullptr);
        set(wnew_dst,  plan ? &plan->wnew_dst  : nullptr);
        set(wread_src, plan ? &plan->wread_src : nullptr);
        set(wread_dst, plan ? &plan->wread_dst : nullptr);
        set(kv_pos,    plan ? &plan->kv_pos    : nullptr);
        if (wread_iota != nullptr && wread_iota->buffer != nullptr) {
            std::vector<int32_t> iota((size_t) ggml_nelements(wread_iota));
            for (size_t i = 0; i < iota.size(); ++i) {
                iota[i] = (int32_t) i;
            }
            set(wread_iota, &iota);
        }
        if (rope_unit != nullptr && rope_unit->buffer != nullptr) {
            const int64_t hd = rope_unit->ne[0];
            std::vector<float> unit((size_t) hd);
            for (int64_t i = 0; i < hd; ++i) {
                unit[i] = aquakv_rope_unit_pattern(i, hd, rope_unit_neox);
            }
            ggml_backend_tensor_set(rope_unit, unit.data(), 0, unit.size()*sizeof(float));
        }
    }

    bool can_reuse(const llm_graph_params & params) override {
        const auto * next = dynamic_cast<const llama_kv_cache_aqua_context *>(params.mctx);
        if (next == nullptr || next->plan() == nullptr) {
            return false;
        }
        const aquakv_plan & p = *next->plan();
        const bool same =
            p.s0 == built.s0 && p.ns == built.ns && p.n_kv == built.n_kv &&
            p.enc_src.size()   == built.enc_src.size()   && p.wnew_src.size() == built.wnew_src.size() &&
            p.wread_src.size() == built.wread_src.size() && p.kv_pos.size()   == built.kv_pos.size();
        if (same) {
            mctx = next;
        }
        return same;
    }

    const llama_kv_cache_aqua_context * mctx;
    aquakv_plan built;  // the list sizes the graph was built for

    ggml_tensor * enc_src   = nullptr;  // I32 [n_enc]
    ggml_tensor * enc_dst   = nullptr;  // I32 [n_enc]
    ggml_tensor * enc_prev  = nullptr;  // I32 [n_enc]
    ggml_tensor * wnew_src  = nullptr;  // I32 [n_wnew]
    ggml_tensor * wnew_dst  = nullptr;  // I32 [n_wnew]
    ggml_tensor * wread_src = nullptr;  // I32 [n_wread]
    ggml_tensor * wread_dst = nullptr;  // I32 [n_wread]
    ggml_tensor * kv_pos    = nullptr;  // I32 [ns*n_kv]
    ggml_tensor * wread_iota = nullptr;  // I32 [n_wread] = 0, 1, ...: folded values' window rows

    // the previous layer's reconstructions while the graph is built: F32 [C, ns*n_kv]
    ggml_tensor * k_hat_prev = nullptr;
    ggml_tensor * v_hat_prev = nullptr;

    // the unit pattern F32 [head_dim] (filled by set_input; repeated over the cells in the graph,
    // so that no per-cell input is uploaded at every step) and the rotations of the attended
    // cells per RoPE (op params and frequency factors) of the graph
    ggml_tensor * rope_unit = nullptr;
    int32_t       rope_unit_neox = 0;
    struct rope_rotations {
        int32_t       params[GGML_MAX_OP_PARAMS/sizeof(int32_t)];
        ggml_tensor * freq_factors;
        ggml_tensor * rot;  // F32 [head_dim, ns*n_kv]
    };
    std::vector<rope_rotations> rope_rots;

    ggml_tensor * rotations(ggml_context * ctx, const ggml_tensor * k_rope, int64_t head_dim, int64_t n_cells) {
        for (const rope_rotations & r : rope_rots) {
            if (r.freq_factors == k_rope->src[2] && std::memcmp(r.params, k_rope->op_params, sizeof(r.params)) == 0) {
                return r.rot;
            }
        }
        const int32_t neox = k_rope->op_params[2] != 0;
        GGML_ASSERT((rope_unit == nullptr || (rope_unit->ne[0] == head_dim && rope_unit_neox == neox)) &&
                    "AQUA-KV: layers with different head sizes or RoPE pairings");
        if (rope_unit == nullptr) {
            rope_unit = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, head_dim);
            ggml_set_input(rope_unit);
            ggml_set_name(rope_unit, "aquakv_rope_unit");
            rope_unit_neox = neox;
        }
        ggml_tensor * units = ggml_repeat_4d(ctx, rope_unit, head_dim, 1, n_cells, 1);
        ggml_tensor * rot = ggml_rope_ext(ctx, units, kv_pos, k_rope->src[2], 0, 0, 0,
                                          0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f);
        std::memcpy(rot->op_params, k_rope->op_params, sizeof(k_rope->op_params));
        rope_rotations entry;
        std::memcpy(entry.params, k_rope->op_params, sizeof(entry.params));
        entry.freq_factors = k_rope->src[2];
        entry.rot = ggml_reshape_2d(ctx, rot, head_dim, n_cells);
        rope_rots.push_back(entry);
        return entry.rot;
    }

private:
    static void set(ggml_tensor * t, const std::vector<int32_t> * values) {
        if (t == nullptr || t->buffer == nullptr) {
            return;
        }
        const size_t n = (size_t) ggml_nelements(t);
        if (values == nullptr) {
            std::vector<int32_t> zeros(n, 0);
            ggml_backend_tensor_set(t, zeros.data(), 0, n*sizeof(int32_t));
            return;
        }
        GGML_ASSERT(values->size() == n && "AQUA-KV plan does not match the graph it was built for");
        ggml_backend_tensor_set(t, values->data(), 0, n*sizeof(int32_t));
    }
};

ggml_tensor * new_index(ggml_context * ctx, size_t n, const char * name) {
    if (n == 0) {
        return nullptr;
    }
    ggml_tensor * t = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, (int64_t) n);
    ggml_set_input(t);
    ggml_set_name(t, name);
    return t;
}

// the codes cache exposes its per-layer rows as views of n_kv cells; their source is the whole
// storage tensor [row_bytes, kv_size, n_stream] that the store op writes into
ggml_tensor * storage_of(ggml_tensor * view) {
    GGML_ASSERT(view->view_src != nullptr && view->view_src->view_src == nullptr);
    return view->view_src;
}

ggml_tensor * as_rows(ggml_context * ctx, ggml_tensor * x, int64_t n_channels) {
    if (!ggml_is_contiguous(x)) {
        x = ggml_cont(ctx, x);
    }
    return ggml_reshape_2d(ctx, x, n_channels, ggml_nelements(x)/n_channels);
}

// How the predictor products are computed (docs/PERF.md).
//   f32: the weights are cast to f32 once per layer, so the products are the reference's f32
//        products: on the CPU a f16 weight would round the activations to f16 (its vec_dot type)
//        and flip near-tie codes between encode and the oracle.
//   f16: the stored f16 weights as they are, half the weight traffic on a GPU. Not a speed lever
//        on an H200 (cuBLAS runs ggml's f32 products as TF32 on tensor cores too: same tokens/s,
//        docs/PERF.md V1); kept as the GPU default because it is never slower.
// auto (default): f16 when the weights live in a GPU buffer, f32 otherwise. AQUAKV_PREDICT_PREC
// = f32 / f16 / auto overrides it (benchmarks, tests).
struct aquakv_predictor_form {
    bool    f16    = false;
    int64_t block  = 0;  // N: [N, N] diagonal blocks
    int64_t n_blk  = 1;  // C/N
};

aquakv_predictor_form aquakv_predictor_form_for(const ggml_tensor * w, const aquakv_model_data & md) {
    // read at every graph build, so a process (a test) may switch it between contexts
    const char * env = std::getenv("AQUAKV_PREDICT_PREC");
    std::string prec = env && *env ? env : "auto";
    if (prec != "auto" && prec != "f32" && prec != "f16") {
        LLAMA_LOG_WARN("aquakv: AQUAKV_PREDICT_PREC must be auto, f32 or f16, got '%s': using auto\n", prec.c_str());
        prec = "auto";
    }
    aquakv_predictor_form form;
    const bool on_gpu = w != nullptr && w->buffer != nullptr && !ggml_backend_buffer_is_host(w->buffer);
    form.f16   = w != nullptr && w->type == GGML_TYPE_F16 && (prec == "f16" || (prec == "auto" && on_gpu));
    form.block = md.block_size;
    form.n_blk = (int64_t) md.n_channels/md.block_size;
    return form;
}

// w: [C, C] as stored -> [C, C] (dense) or its diagonal blocks [N, N, C/N], contiguous, in the
// form's type; built once per layer and shared by the encode and the read products
ggml_tensor * aquakv_predictor_weight(ggml_context * ctx, ggml_tensor * w, const aquakv_predictor_form & form) {
    if (w == nullptr) {
        return nullptr;  // layer 0 has no predictors
    }
    const ggml_type type = form.f16 ? GGML_TYPE_F16 : GGML_TYPE_F32;
    if (form.n_blk == 1) {
        return w->type == type ? w : ggml_cast(ctx, w, type);
    }
    const int64_t N = form.block;
    // block b is rows b*N.., columns b*N..: a strided 3-D view of the diagonal
    ggml_tensor * diag = ggml_view_3d(ctx, w, N, N, form.n_blk, w->nb[1], w->nb[1]*N + w->nb[0]*N, 0);
    return w->type == type ? ggml_cont(ctx, diag) : ggml_cast(ctx, diag, type);
}

// w · x for x: F32 [C, T]: one matmul (dense) or C/N batched [N, N] x [N] products
ggml_tensor * aquakv_predictor_product(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x,
                                       const aquakv_predictor_form & form) {
    if (form.n_blk == 1) {
        return ggml_mul_mat(ctx, w, x);
    }
    const int64_t N = form.block;
    const int64_t T = x->ne[1];
    // blocks on the batch dimension: [N, T, C/N] views of x, batched [N, N] x [N, T] products.
    // (Broadcast mat-vecs over x viewed as [N, 1, C/N, T] avoid both permute copies but ran
    // 20x slower on CUDA at 32K cells: docs/PERF.md, V4.)
    ggml_tensor * xb = ggml_permute(ctx, ggml_reshape_3d(ctx, x, N, form.n_blk, T), 0, 2, 1, 3);  // [N, T, C/N]
    ggml_tensor * y  = ggml_mul_mat(ctx, w, xb);                                                   // [N, T, C/N]
    return ggml_reshape_2d(ctx, ggml_cont(ctx, ggml_permute(ctx, y, 0, 2, 1, 3)), N*form.n_blk, T);
}

// what the reconstruct op adds to the decoded residuals of every attended cell
struct aquakv_read_prediction {
    ggml_tensor * pred = nullptr;  // F32 [C, cells], or the predictor input in0 when `down` is set
    ggml_tensor * up   = nullptr;  // with `down`: the whole low-rank prediction U·(D·x) inside the op
    ggml_tensor * bias = nullptr;  // [C]
    ggml_tensor * down = nullptr;  // [C_in, R] (host memory only)
    ggml_tensor * in1  = nullptr;  // the second predictor input (values: V̂_{l-1})
};

// whether layer l >= 1's predictor weights live in host memory (the CPU runs its products)
bool aquakv_layer_on_host(const aquakv_layer_tensors & P) {
    const ggml_tensor * w = P.k_up ? P.k_up : P.k_pred_w;
    return w != nullptr && w->buffer != nullptr && ggml_backend_buffer_is_host(w->buffer);
}

} // namespace

uint32_t aquakv_graph_extra_nodes(const llama_model & model) {
    if (!model.aquakv || !model.aquakv->enabled) {
        return 0;
    }
    // per layer, keys and values: the store (f16 rounding, gathers, prediction, encode) and the
    // read (decode, prediction, window rows, RoPE) are ~60 objects; a block-diagonal product adds
    // 5 reshapes/permutes to each of the 6 products and 2 per weight; a low-rank layer has 10
    // products and 5 weight casts
    const aquakv_model_data & md = *model.aquakv;
    const uint32_t per_layer = md.predictor == AQUAKV_PREDICTOR_LOWRANK ? 128 : md.block_size == md.n_channels ? 96 : 160;
    return per_layer*(uint32_t) model.aquakv->layers.size();
}

void aquakv_graph_add_inputs(const llm_graph_context & gctx, llm_graph_input_attn_kv & inp) {
    const auto * mctx = dynamic_cast<const llama_kv_cache_aqua_context *>(inp.mctx);
    if (mctx == nullptr) {
        return;
    }
    auto obj = std::make_unique<aquakv_graph_input>(mctx);
    if (mctx->plan()) {
        obj->built = *mctx->plan();
    } else {
        mctx->cache()->plan_reserve(gctx.ubatch.n_tokens, obj->built);
    }
    const aquakv_plan & p = obj->built;
    ggml_context * ctx0 = gctx.ctx0;
    obj->enc_src   = new_index(ctx0, p.enc_src.size(),   "aquakv_enc_src");
    obj->enc_dst   = new_index(ctx0, p.enc_dst.size(),   "aquakv_enc_dst");
    obj->enc_prev  = new_index(ctx0, p.enc_prev.size(),  "aquakv_enc_prev");
    obj->wnew_src  = new_index(ctx0, p.wnew_src.size(),  "aquakv_wnew_src");
    obj->wnew_dst  = new_index(ctx0, p.wnew_dst.size(),  "aquakv_wnew_dst");
    obj->wread_src = new_index(ctx0, p.wread_src.size(), "aquakv_wread_src");
    obj->wread_dst = new_index(ctx0, p.wread_dst.size(), "aquakv_wread_dst");
    obj->kv_pos    = new_index(ctx0, p.kv_pos.size(),    "aquakv_kv_pos");
    if (mctx->cache()->data().values_from_keys) {
        obj->wread_iota = new_index(ctx0, p.wread_src.size(), "aquakv_wread_iota");
    }
    inp.aquakv = gctx.res->add_input(std::move(obj));
}

ggml_tensor * aquakv_build_attn(const llm_graph_context & gctx, llm_graph_input_attn_kv * inp,
                                ggml_tensor * wo, ggml_tensor * wo_b, ggml_tensor * wo_s,
                                ggml_tensor * q_cur, ggml_tensor * k_cur, ggml_tensor * v_cur,
                                ggml_tensor * kq_b, ggml_tensor * sinks, float kq_scale, int il) {
    auto * ai = static_cast<aquakv_graph_input *>(inp->aquakv);
    const llama_kv_cache_aqua * cache = ai->mctx->cache();
    const aquakv_model_data & md = cache->data();
    const aquakv_plan & plan = ai->built;
    ggml_context * ctx0 = gctx.ctx0;
    ggml_cgraph  * gf   = gctx.gf;

    if (k_cur->op != GGML_OP_ROPE) {
        GGML_ABORT("aquakv: the model builder's key is not the output of RoPE; AQUA-KV needs the pre-RoPE key "
                   "(unsupported architecture)");
    }
    if (il == 0) {
        ai->k_hat_prev = nullptr;
        ai->v_hat_prev = nullptr;
        ai->rope_rots.clear();
    }
    GGML_ASSERT((il == 0) == (ai->k_hat_prev == nullptr) && "AQUA-KV layers must be built in order");

    const int64_t C         = md.n_channels;
    const int32_t G         = (int32_t) md.group_size;
    const int64_t head_dim  = k_cur->ne[0];
    const int64_t n_head_kv = k_cur->ne[1];
    GGML_ASSERT(head_dim*n_head_kv == C);

    const uint32_t kv_size  = cache->get_size();
    const uint32_t n_stream = cache->get_n_stream();
    const uint32_t n_win    = cache->get_n_win();
    const int64_t  n_kv     = plan.n_kv;
    const int64_t  ns       = plan.ns;
    ggml_tensor * grid = il == 0 ? md.grid0 : md.grid;
    const aquakv_layer_tensors & P = md.layers.at(il);

    ggml_tensor * k_new = as_rows(ctx0, k_cur->src[0], C);  // pre-RoPE keys [C, n_tokens]
    ggml_tensor * v_new = as_rows(ctx0, v_cur, C);          // [C, n_tokens]
    gctx.cb(k_new, "aquakv_k_new", il);
    gctx.cb(v_new, "aquakv_v_new", il);

    ggml_tensor * k_storage = storage_of(ai->mctx->get_k(ctx0, il));
    ggml_tensor * v_storage = storage_of(ai->mctx->get_v(ctx0, il));
    // one cache side (K or V): store this ubatch; returns the codes of the attended cells
    auto store = [&](ggml_tensor * x_new, ggml_tensor * codes_storage, ggml_tensor * win2,
                     auto && predict) -> ggml_tensor * {
        const size_t row_bytes = (size_t) codes_storage->ne[0];
        ggml_tensor * codes2 = ggml_reshape_2d(ctx0, codes_storage, row_bytes, (int64_t) kv_size*n_stream);
        ggml_tensor * codes_src = codes2;
        if (ai->enc_src || ai->wnew_src) {
            ggml_tensor * resid = nullptr;
            if (ai->enc_src) {
                // chunks are quantized from the f16 values the window holds; a token quantized on
                // arrival is rounded the same way (the reference cache's semantics)
                ggml_tensor * x_f16 = ggml_cast(ctx0, ggml_cast(ctx0, x_new, GGML_TYPE_F16), GGML_TYPE_F32);
                ggml_tensor * src = ggml_concat(ctx0, ggml_cast(ctx0, win2, GGML_TYPE_F32), x_f16, 1);
                resid = ggml_get_rows(ctx0, src, ai->enc_src);  // [C, n_enc]
                if (il > 0) {
                    resid = ggml_sub(ctx0, resid, predict(ai->enc_prev));
                }
            }
            ggml_tensor * win_rows = ai->wnew_src ? ggml_get_rows(ctx0, x_new, ai->wnew_src) : nullptr;
            codes_src = ggml_aquakv_store(ctx0, codes2, resid, ai->enc_dst, grid, G,
                                     ai->wnew_src ? win2 : nullptr, win_rows, ai->wnew_dst);
            ggml_build_forward_expand(gf, codes_src);  // the store runs before any read of this layer
        }
        return ggml_view_3d(ctx0, codes_src, row_bytes, n_kv, ns, row_bytes, row_bytes*kv_size,
                            row_bytes*kv_size*plan.s0);
    };
    auto window_of = [&](ggml_tensor * win_storage) {
        return ggml_reshape_2d(ctx0, win_storage, C, (int64_t) n_win*n_stream);
    };
    // store, then reconstruct the attended cells
    auto store_and_read = [&](ggml_tensor * x_new, ggml_tensor * codes_storage, ggml_tensor * win_storage,
                              auto && predict, auto && read_pred) -> ggml_tensor * {
        ggml_tensor * win2 = window_of(win_storage);
        ggml_tensor * codes_view = store(x_new, codes_storage, win2, predict);
        // one op: decode + prediction + bias, window rows over their cells (docs/PERF.md)
        const aquakv_read_prediction rp = il > 0 ? read_pred() : aquakv_read_prediction{};
        ggml_tensor * win_r = ai->wread_src ? win2 : nullptr;
        ggml_tensor * rec = rp.down
            ? ggml_aquakv_reconstruct_lowrank(ctx0, codes_view, grid, (int32_t) C, G, rp.pred, rp.in1, rp.down, rp.up,
                                              rp.bias, win_r, ai->wread_src, ai->wread_dst)
            : ggml_aquakv_reconstruct(ctx0, codes_view, grid, (int32_t) C, G, rp.pred, rp.bias, win_r, ai->wread_src,
                                      ai->wread_dst);
        gctx.cb(rec, codes_storage == k_storage ? "aquakv_k_reconstruct" : "aquakv_v_reconstruct", il);
        return ggml_reshape_2d(ctx0, rec, C, n_kv*ns);  // F32 [C, ns*n_kv]
    };

    // rows == nullptr: predictions for every attended cell; else for the rows listed
    auto gather = [&](ggml_tensor * x, ggml_tensor * rows) { return rows ? ggml_get_rows(ctx0, x, rows) : x; };
    ggml_tensor * k_hat = nullptr;
    ggml_tensor * v_hat = nullptr;
    // the value predictor's second input: v̂_{l-1}, or k̂_{l-1} for files without a value chain
    ggml_tensor * v_in = md.values_from_keys ? ai->k_hat_prev : ai->v_hat_prev;
    // values: v_lin(rows) = B·x (x = [k̂_l ; v_in] at the rows), v_read() the read prediction,
    // v_fold(a) = B·a per query head for a = Σ_t p_t x_t: F32 [2C, n_tok, n_head, ns]
    std::function<ggml_tensor * (ggml_tensor *)> v_lin;
    std::function<aquakv_read_prediction()>     v_read;
    std::function<ggml_tensor * (ggml_tensor *)> v_fold;
    int64_t v_macs_per_cell = 0;  // multiply-adds of the value prediction of one cell
    const bool on_host = il > 0 && aquakv_layer_on_host(P);
    if (md.predictor == AQUAKV_PREDICTOR_LOWRANK) {
        // p = U·(D·x) + b: the inner R-vectors z by ggml products; the up-projection inside the
        // reconstruct op where U lives in host memory (CPU), else a product (cuBLAS) whose result
        // the op adds
        const aquakv_predictor_form form = aquakv_predictor_form_for(P.k_down, md);
        ggml_tensor * k_dn  = aquakv_predictor_weight(ctx0, P.k_down,   form);
        ggml_tensor * v_dnk = aquakv_predictor_weight(ctx0, P.v_down_k, form);
        ggml_tensor * v_dnv = aquakv_predictor_weight(ctx0, P.v_down_v, form);
        ggml_tensor * k_upw = aquakv_predictor_weight(ctx0, P.k_up,     form);
        ggml_tensor * v_upw = aquakv_predictor_weight(ctx0, P.v_up,     form);
        // on the CPU the whole prediction U·(D·x) runs inside the reconstruct op; elsewhere D and U
        // are ggml products (cuBLAS) and the op adds their result
        const bool in_op = on_host;
        ggml_tensor * v_dn_kv = il > 0 ? ggml_concat(ctx0, v_dnk, v_dnv, 0) : nullptr;  // [2C, R_v]
        auto read_lowrank = [&](ggml_tensor * z, ggml_tensor * up_w, ggml_tensor * b) {
            return aquakv_read_prediction{ ggml_mul_mat(ctx0, up_w, z), nullptr, b };  // p = U·z: a product
        };
        k_hat = store_and_read(k_new, k_storage, cache->win_k(il),
            [&](ggml_tensor * rows) {
                return ggml_add(ctx0, ggml_mul_mat(ctx0, k_upw, ggml_mul_mat(ctx0, k_dn, gather(ai->k_hat_prev, rows))),
                                P.k_pred_b);
            },
            [&]() {
                if (in_op) {
                    return aquakv_read_prediction{ ai->k_hat_prev, P.k_up, P.k_pred_b, k_dn, nullptr };
                }
                return read_lowrank(ggml_mul_mat(ctx0, k_dn, ai->k_hat_prev), k_upw, P.k_pred_b);
            });
        auto v_inner = [=](ggml_tensor * rows) {
            return ggml_add(ctx0, ggml_mul_mat(ctx0, v_dnk, gather(k_hat, rows)),
                                  ggml_mul_mat(ctx0, v_dnv, gather(v_in, rows)));
        };
        v_lin  = [=](ggml_tensor * rows) { return ggml_mul_mat(ctx0, v_upw, v_inner(rows)); };
        v_read = [=]() {
            if (in_op) {
                return aquakv_read_prediction{ k_hat, P.v_up, P.v_pred_b, v_dn_kv, v_in };
            }
            return read_lowrank(v_inner(nullptr), v_upw, P.v_pred_b);
        };
        v_fold = [=](ggml_tensor * a) {
            // z = D·a for every query row, then each head's rows of U: [R_v, d_h, n_head_kv]
            // broadcast over the heads of its group
            ggml_tensor * z = ggml_mul_mat(ctx0, v_dn_kv, a);
            return ggml_mul_mat(ctx0, ggml_reshape_3d(ctx0, v_upw, v_upw->ne[0], head_dim, n_head_kv), z);
        };
        v_macs_per_cell = (int64_t) md.rank_v*3*C;
    } else {
        const aquakv_predictor_form form = aquakv_predictor_form_for(P.k_pred_w, md);
        ggml_tensor * k_w   = aquakv_predictor_weight(ctx0, P.k_pred_w,   form);
        ggml_tensor * v_k_w = aquakv_predictor_weight(ctx0, P.v_pred_k_w, form);
        ggml_tensor * v_v_w = aquakv_predictor_weight(ctx0, P.v_pred_v_w, form);
        auto product = [=](ggml_tensor * w, ggml_tensor * x) { return aquakv_predictor_product(ctx0, w, x, form); };
        k_hat = store_and_read(k_new, k_storage, cache->win_k(il),
            [&](ggml_tensor * rows) { return ggml_add(ctx0, product(k_w, gather(ai->k_hat_prev, rows)), P.k_pred_b); },
            [&]() { return aquakv_read_prediction{ product(k_w, ai->k_hat_prev), nullptr, P.k_pred_b }; });
        v_lin  = [=](ggml_tensor * rows) {
            return ggml_add(ctx0, product(v_k_w, gather(k_hat, rows)), product(v_v_w, gather(v_in, rows)));
        };
        v_read = [=]() { return aquakv_read_prediction{ v_lin(nullptr), nullptr, P.v_pred_b }; };
        v_fold = [=](ggml_tensor * a) {
            // [C, C] weights as [C, d_h, n_head_kv]: each head's output rows, broadcast over the
            // heads of its group; a block-diagonal weight is used whole (its zeros included)
            aquakv_predictor_form whole = form;
            whole.n_blk = 1;
            ggml_tensor * wk = aquakv_predictor_weight(ctx0, P.v_pred_k_w, whole);
            ggml_tensor * wv = aquakv_predictor_weight(ctx0, P.v_pred_v_w, whole);
            ggml_tensor * a_k = ggml_view_4d(ctx0, a, C, a->ne[1], a->ne[2], a->ne[3], a->nb[1], a->nb[2], a->nb[3], 0);
            ggml_tensor * a_v = ggml_view_4d(ctx0, a, C, a->ne[1], a->ne[2], a->ne[3], a->nb[1], a->nb[2], a->nb[3],
                                             C*sizeof(float));
            return ggml_add(ctx0, ggml_mul_mat(ctx0, ggml_reshape_3d(ctx0, wk, C, head_dim, n_head_kv), a_k),
                                  ggml_mul_mat(ctx0, ggml_reshape_3d(ctx0, wv, C, head_dim, n_head_kv), a_v));
        };
        v_macs_per_cell = 2*C*form.block;
    }
    gctx.cb(k_hat, "aquakv_k_hat", il);

    // Values folded onto the attention output (files without a value chain): per query row
    //   Σ_t p_t (B·x_t + b + r_t) = B·(Σ_t p_t x_t) + Σ_t p_t (r_t + b)
    // with x_t = [k̂_l ; k̂_{l-1}] of cell t and r_t its decoded residual (window cells: the row
    // v_t - B·x_t, so the sum still sees their exact values): no value is reconstructed, B runs
    // once per query row instead of once per cell. Chosen when that is the cheaper product
    // (decoding; a long prompt batch reconstructs), on the CPU (the sum has no CUDA kernel yet),
    // for attention without bias, sinks or logit soft-capping. AQUAKV_FOLD_VALUES = 0 / 1 forces
    // it off / on (where possible), for tests and benchmarks.
    const int64_t n_head      = q_cur->ne[1];
    const int64_t n_tok       = q_cur->ne[2]/ns;
    const bool    can_fold    = il > 0 && md.values_from_keys && on_host && kq_b == nullptr && sinks == nullptr &&
                                !gctx.hparams.attn_soft_cap && gctx.arch != LLM_ARCH_GROK;
    const char *  fold_env    = std::getenv("AQUAKV_FOLD_VALUES");
    const std::string fold_mode = fold_env && *fold_env ? fold_env : "auto";
    const bool    fold = can_fold && (fold_mode == "1" ||
                                      (fold_mode != "0" && n_tok*n_head*(2*C + head_dim) < v_macs_per_cell));

    ggml_tensor * v_res = nullptr;  // folded: F32 [C, ns*n_kv] residual rows (+ b)
    if (fold) {
        ggml_tensor * win2 = window_of(cache->win_v(il));
        ggml_tensor * codes_view = store(v_new, v_storage, win2,
                                         [&](ggml_tensor * rows) { return ggml_add(ctx0, v_lin(rows), P.v_pred_b); });
        ggml_tensor * win_r = nullptr;
        if (ai->wread_src) {
            win_r = ggml_sub(ctx0, ggml_get_rows(ctx0, win2, ai->wread_src), v_lin(ai->wread_dst));  // [C, n_wread]
        }
        ggml_tensor * rec = ggml_aquakv_reconstruct(ctx0, codes_view, grid, (int32_t) C, G, nullptr, P.v_pred_b, win_r,
                                                    ai->wread_iota, ai->wread_dst);
        gctx.cb(rec, "aquakv_v_residual", il);
        v_res = ggml_reshape_2d(ctx0, rec, C, n_kv*ns);
    } else {
        v_hat = store_and_read(v_new, v_storage, cache->win_v(il),
            [&](ggml_tensor * rows) { return ggml_add(ctx0, v_lin(rows), P.v_pred_b); },
            [&]() { return v_read(); });
        gctx.cb(v_hat, "aquakv_v_hat", il);
    }

    ai->k_hat_prev = k_hat;
    ai->v_hat_prev = v_hat;  // nullptr when folded: no later layer reads it (no value chain)

    // RoPE by cell position, with the model's own RoPE parameters. Flash attention reads f16
    // K/V: cast here, while the rows are contiguous; left to build_attn_mha the cast would copy
    // a permuted view, several times slower on CUDA (docs/PERF.md). Same values either way:
    // f32 RoPE, then one rounding to f16.
    ggml_tensor * k_hat3 = ggml_reshape_3d(ctx0, k_hat, head_dim, n_head_kv, n_kv*ns);
    ggml_tensor * k_att = nullptr;
    const int32_t rope_mode = k_cur->op_params[2];
    const bool    rope_one_pass = gctx.cparams.flash_attn && k_cur->op_params[1] == head_dim &&
                                  (rope_mode == 0 || rope_mode == GGML_ROPE_TYPE_NEOX);
    if (rope_one_pass) {
        // RoPE and the cast in one pass, with the rotations of every cell from one ggml RoPE of
        // the unit pattern, shared by the layers that have the same RoPE (aquakv-ops.h)
        k_att = ggml_aquakv_rope_f16(ctx0, k_hat3, ai->rotations(ctx0, k_cur, head_dim, n_kv*ns), rope_mode != 0);
        gctx.cb(k_att, "aquakv_k_rope_f16", il);
    } else {
        ggml_tensor * k_rope = ggml_rope_ext(ctx0, k_hat3, ai->kv_pos, k_cur->src[2], 0, 0, 0,
                                             0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f);
        std::memcpy(k_rope->op_params, k_cur->op_params, sizeof(k_cur->op_params));
        k_att = gctx.cparams.flash_attn ? ggml_cast(ctx0, k_rope, GGML_TYPE_F16) : k_rope;
    }
    ggml_tensor * k = ggml_reshape_4d(ctx0, k_att, head_dim, n_head_kv, n_kv, ns);
    ggml_build_forward_expand(gf, q_cur);
    ggml_tensor * cur = nullptr;
    if (fold) {
        // the plain (not flash) attention of build_attn_mha, with the value side folded
        ggml_tensor * q = ggml_view_4d(ctx0, q_cur, q_cur->ne[0], n_head, n_tok, ns, q_cur->nb[1], q_cur->nb[2],
                                       q_cur->nb[2]*n_tok, 0);
        q = ggml_permute(ctx0, q, 0, 2, 1, 3);                                // [d_h, n_tok, n_head, ns]
        ggml_tensor * kq = ggml_mul_mat(ctx0, ggml_permute(ctx0, k, 0, 2, 1, 3), q);  // [n_kv, n_tok, n_head, ns]
        ggml_prec_set_acc(kq, GGML_PREC_F32);
        kq = ggml_soft_max_ext(ctx0, kq, inp->get_kq_mask(), kq_scale, gctx.hparams.f_max_alibi_bias);
        gctx.cb(kq, "kq_soft_max", il);
        ggml_tensor * a_x = ggml_aquakv_attn_sum(ctx0, kq, k_hat, v_in, 0);                  // [2C, n_tok, n_head, ns]
        ggml_tensor * a_r = ggml_aquakv_attn_sum(ctx0, kq, v_res, nullptr, (int32_t) n_head_kv);  // [d_h, ...]
        gctx.cb(a_x, "aquakv_attn_x", il);
        gctx.cb(a_r, "aquakv_attn_r", il);
        cur = ggml_add(ctx0, v_fold(a_x), a_r);                                // [d_h, n_tok, n_head, ns]
        cur = ggml_cont_2d(ctx0, ggml_permute(ctx0, cur, 0, 2, 1, 3), head_dim*n_head, n_tok*ns);
        ggml_build_forward_expand(gf, cur);
    } else {
        ggml_tensor * v_att = v_hat;
        if (gctx.cparams.flash_attn) {
            // the plain cast of the fused op (rot = NULL): on CUDA 3.9 TB/s against 0.56 for
            // ggml's strided copy (docs/PERF.md V8); identical bits
            v_att = ggml_aquakv_rope_f16(ctx0, ggml_reshape_3d(ctx0, v_hat, head_dim, n_head_kv, n_kv*ns), nullptr, 0);
        }
        ggml_tensor * v = ggml_reshape_4d(ctx0, v_att, head_dim, n_head_kv, n_kv, ns);
        cur = gctx.build_attn_mha(q_cur, k, v, kq_b, inp->get_kq_mask(), sinks, nullptr, 0, kq_scale, il);
    }
    gctx.cb(cur, "kqv_out", il);

    if (wo) {
        cur = gctx.build_lora_mm(wo, cur, wo_s);
    }
    if (wo_b) {
        cur = ggml_add(ctx0, cur, wo_b);
    }
    return cur;
}
