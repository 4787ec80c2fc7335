// Constructors of the AQUA-KV ggml ops (GGML_OP_AQUAKV_STORE / GGML_OP_AQUAKV_DECODE).
// The kernels live with each backend: native/ops-cpu (and native/ops-cuda).
#include "aquakv-ops.h"

#include <cstring>
#include <initializer_list>

namespace {

void set_layout_params(ggml_tensor * t, const aquakv_row_layout & l) {
    const int32_t p[AQUAKV_P_COUNT] = { l.n_channels, l.group_size, l.grid_dim, l.grid_size, l.bits, AQUAKV_READ_RECONSTRUCT };
    static_assert(sizeof(p) <= GGML_MAX_OP_PARAMS, "op params");
    std::memcpy(t->op_params, p, sizeof(p));
}

aquakv_row_layout layout_for(int64_t n_channels, int32_t group_size, const ggml_tensor * grid) {
    GGML_ASSERT(grid->type == GGML_TYPE_F32 && ggml_n_dims(grid) <= 2);
    aquakv_row_layout l;
    GGML_ASSERT(aquakv_make_layout(n_channels, group_size, grid->ne[0], grid->ne[1], &l) &&
                "invalid AQUA-KV channel count / group size / grid combination");
    return l;
}

} // namespace

extern "C" ggml_tensor * ggml_aquakv_store(ggml_context * ctx, ggml_tensor * codes, ggml_tensor * resid,
                                      ggml_tensor * idx, ggml_tensor * grid, int32_t group_size,
                                      ggml_tensor * win, ggml_tensor * win_rows, ggml_tensor * win_idx) {
    GGML_ASSERT(resid || win);
    const int64_t n_channels = resid ? resid->ne[0] : win->ne[0];
    const aquakv_row_layout l = layout_for(n_channels, group_size, grid);

    GGML_ASSERT(codes->type == GGML_TYPE_I8 && ggml_n_dims(codes) <= 2);
    GGML_ASSERT((size_t) codes->ne[0] == l.row_bytes && "codes rows do not match the AQUA-KV row layout");
    if (resid) {
        GGML_ASSERT(resid->type == GGML_TYPE_F32 && ggml_n_dims(resid) <= 2 && resid->nb[0] == sizeof(float));
        GGML_ASSERT(idx && idx->type == GGML_TYPE_I32 && ggml_is_contiguous(idx) && ggml_nelements(idx) == resid->ne[1]);
    }
    if (win) {
        GGML_ASSERT(win->type == GGML_TYPE_F16 && ggml_n_dims(win) <= 2 && win->ne[0] == n_channels);
        GGML_ASSERT(win_rows && win_rows->type == GGML_TYPE_F32 && win_rows->ne[0] == n_channels &&
                    ggml_n_dims(win_rows) <= 2 && win_rows->nb[0] == sizeof(float));
        GGML_ASSERT(win_idx && win_idx->type == GGML_TYPE_I32 && ggml_is_contiguous(win_idx) &&
                    ggml_nelements(win_idx) == win_rows->ne[1]);
    }

    ggml_tensor * result = ggml_view_tensor(ctx, codes);
    result->op     = GGML_OP_AQUAKV_STORE;
    result->src[0] = codes;
    result->src[1] = resid;
    result->src[2] = resid ? idx : nullptr;
    result->src[3] = grid;
    result->src[4] = win;
    result->src[5] = win ? win_rows : nullptr;
    result->src[6] = win ? win_idx : nullptr;
    set_layout_params(result, l);
    return result;
}

extern "C" ggml_tensor * ggml_aquakv_decode(ggml_context * ctx, ggml_tensor * codes, ggml_tensor * grid,
                                       int32_t n_channels, int32_t group_size) {
    const aquakv_row_layout l = layout_for(n_channels, group_size, grid);
    GGML_ASSERT(codes->type == GGML_TYPE_I8 && codes->nb[0] == 1);
    GGML_ASSERT((size_t) codes->ne[0] == l.row_bytes && "codes rows do not match the AQUA-KV row layout");

    ggml_tensor * result = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, n_channels, codes->ne[1], codes->ne[2], codes->ne[3]);
    result->op     = GGML_OP_AQUAKV_DECODE;
    result->src[0] = codes;
    result->src[1] = grid;
    set_layout_params(result, l);
    return result;
}

extern "C" ggml_tensor * ggml_aquakv_reconstruct(ggml_context * ctx, ggml_tensor * codes, ggml_tensor * grid,
                                            int32_t n_channels, int32_t group_size, ggml_tensor * pred,
                                            ggml_tensor * bias, ggml_tensor * win, ggml_tensor * win_src,
                                            ggml_tensor * win_dst) {
    ggml_tensor * result = ggml_aquakv_decode(ctx, codes, grid, n_channels, group_size);
    const int64_t n_rows = codes->ne[1]*codes->ne[2]*codes->ne[3];
    if (pred) {
        GGML_ASSERT(pred->type == GGML_TYPE_F32 && pred->nb[0] == sizeof(float) && ggml_n_dims(pred) <= 2);
        GGML_ASSERT(pred->ne[0] == n_channels && pred->ne[1] == n_rows && "AQUA-KV prediction does not match the rows");
    }
    if (bias) {
        GGML_ASSERT(bias->type == GGML_TYPE_F32 && ggml_is_contiguous(bias) && ggml_nelements(bias) == n_channels);
    }
    if (win) {
        GGML_ASSERT((win->type == GGML_TYPE_F16 || win->type == GGML_TYPE_F32) && win->ne[0] == n_channels &&
                    ggml_n_dims(win) <= 2);
        GGML_ASSERT(win_src && win_dst && win_src->type == GGML_TYPE_I32 && win_dst->type == GGML_TYPE_I32);
        GGML_ASSERT(ggml_is_contiguous(win_src) && ggml_is_contiguous(win_dst) &&
                    ggml_nelements(win_src) == ggml_nelements(win_dst));
    }
    result->src[2] = pred;
    result->src[3] = bias;
    result->src[4] = win;
    result->src[5] = win ? win_src : nullptr;
    result->src[6] = win ? win_dst : nullptr;
    return result;
}

extern "C" ggml_tensor * ggml_aquakv_reconstruct_lowrank(ggml_context * ctx, ggml_tensor * codes, ggml_tensor * grid,
                                                    int32_t n_channels, int32_t group_size, ggml_tensor * in0,
                                                    ggml_tensor * in1, ggml_tensor * down, ggml_tensor * up,
                                                    ggml_tensor * bias, ggml_tensor * win, ggml_tensor * win_src,
                                                    ggml_tensor * win_dst) {
    GGML_ASSERT(in0 && down && up && "the low-rank read needs its input, down- and up-projections");
    ggml_tensor * result = ggml_aquakv_reconstruct(ctx, codes, grid, n_channels, group_size, nullptr,
                                                   bias, win, win_src, win_dst);
    const int64_t n_rows = codes->ne[1]*codes->ne[2]*codes->ne[3];
    for (ggml_tensor * in : { in0, in1 }) {
        if (in) {
            GGML_ASSERT(in->type == GGML_TYPE_F32 && in->nb[0] == sizeof(float) && ggml_n_dims(in) <= 2);
            GGML_ASSERT(in->ne[0] == n_channels && in->ne[1] == n_rows && "AQUA-KV predictor input does not match the rows");
        }
    }
    const int64_t R = up->ne[0];
    GGML_ASSERT((up->type == GGML_TYPE_F16 || up->type == GGML_TYPE_F32) && ggml_is_contiguous(up));
    GGML_ASSERT(up->ne[1] == n_channels && ggml_n_dims(up) <= 2);
    GGML_ASSERT((down->type == GGML_TYPE_F16 || down->type == GGML_TYPE_F32) && ggml_is_contiguous(down));
    GGML_ASSERT(down->ne[0] == n_channels*(in1 ? 2 : 1) && down->ne[1] == R && ggml_n_dims(down) <= 2 &&
                "AQUA-KV down-projection does not match its inputs and the up-projection");
    result->src[2] = in0;
    result->src[7] = up;
    result->src[8] = down;
    result->src[9] = in1;
    return result;
}

extern "C" ggml_tensor * ggml_aquakv_rope_f16(ggml_context * ctx, ggml_tensor * x, ggml_tensor * rot, int32_t neox) {
    GGML_ASSERT(x->type == GGML_TYPE_F32 && ggml_is_contiguous(x) && ggml_n_dims(x) <= 3);
    if (rot) {
        GGML_ASSERT(rot->type == GGML_TYPE_F32 && ggml_is_contiguous(rot));
        GGML_ASSERT(x->ne[0] % 2 == 0 && rot->ne[0] == x->ne[0] && ggml_nelements(rot) == x->ne[0]*x->ne[2] &&
                    "AQUA-KV RoPE table does not match the keys");
    }
    ggml_tensor * result = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, x->ne[0], x->ne[1], x->ne[2]);
    result->op = GGML_OP_AQUAKV_DECODE;
    const int32_t p[AQUAKV_P_COUNT] = { 0, 0, 0, 0, 0, AQUAKV_READ_ROPE_F16 };
    std::memcpy(result->op_params, p, sizeof(p));
    result->op_params[AQUAKV_P_COUNT] = neox ? 1 : 0;
    result->src[0] = x;
    result->src[1] = rot;
    return result;
}

extern "C" ggml_tensor * ggml_aquakv_attn_sum(ggml_context * ctx, ggml_tensor * p, ggml_tensor * y0, ggml_tensor * y1,
                                         int32_t n_group) {
    GGML_ASSERT(p->type == GGML_TYPE_F32 && ggml_is_contiguous(p));
    const int64_t n_kv = p->ne[0], n_head = p->ne[2], ns = p->ne[3];
    for (const ggml_tensor * y : { y0, y1 }) {
        if (y) {
            GGML_ASSERT(y->type == GGML_TYPE_F32 && y->nb[0] == sizeof(float) && ggml_n_dims(y) <= 2);
            GGML_ASSERT(y->ne[1] == n_kv*ns && "AQUA-KV attention sum: rows do not match the attended cells");
        }
    }
    int64_t m = y0->ne[0] + (y1 ? y1->ne[0] : 0);
    if (n_group > 0) {
        GGML_ASSERT(y1 == nullptr && n_head % n_group == 0 && y0->ne[0] % n_group == 0 &&
                    "AQUA-KV attention sum: the groups do not divide the heads and channels");
        m = y0->ne[0]/n_group;
    }
    ggml_tensor * result = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, m, p->ne[1], n_head, ns);
    result->op = GGML_OP_AQUAKV_DECODE;
    const int32_t params[AQUAKV_P_COUNT] = { 0, 0, 0, 0, 0, AQUAKV_READ_ATTN_SUM };
    std::memcpy(result->op_params, params, sizeof(params));
    result->op_params[AQUAKV_P_COUNT] = n_group;
    result->src[0] = p;
    result->src[1] = y0;
    result->src[2] = y1;
    return result;
}
