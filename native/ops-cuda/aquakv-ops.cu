// ggml-cuda dispatch of the AQUA-KV ops (the kernels are in aquakv-kernels.cu).
#include "aquakv-ops-cuda.cuh"
#include "aquakv-kernels.cuh"
#include "aquakv-ops.h"

namespace {

aquakv_cuda_layout make_args(const ggml_tensor * op) {
    const aquakv_row_layout l = aquakv_layout_from_op(op);
    return { l.n_channels, l.group_size, l.grid_dim, l.grid_size, l.bits, (int) l.code_bytes, (int) l.row_bytes };
}

// AQUAKV_READ_ROPE_F16: its layout params are zero, the shapes are all there is to check
bool rope_f16_supported(const ggml_tensor * op) {
    const ggml_tensor * x   = op->src[0];
    const ggml_tensor * rot = op->src[1];
    if (x == nullptr || x->type != GGML_TYPE_F32 || op->type != GGML_TYPE_F16 || !ggml_is_contiguous(x) ||
        !ggml_is_contiguous(op) || !ggml_are_same_shape(x, op)) {
        return false;
    }
    if (rot == nullptr) {
        return true;  // the plain cast
    }
    return rot->type == GGML_TYPE_F32 && ggml_is_contiguous(rot) && x->ne[3] == 1 && x->ne[0] % 2 == 0 &&
           rot->ne[0] == x->ne[0] && ggml_nelements(rot) == x->ne[0]*x->ne[2];
}

void rope_f16(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * x = dst->src[0];
    if (dst->src[1] == nullptr) {
        CUDA_CHECK(aquakv_cuda_cast_f16(ctx.stream(), (const float *) x->data, dst->data, ggml_nelements(x)));
        return;
    }
    CUDA_CHECK(aquakv_cuda_rope_f16(ctx.stream(), (const float *) x->data, (const float *) dst->src[1]->data, dst->data,
                                    x->ne[0], x->ne[1], x->ne[2], dst->op_params[AQUAKV_P_COUNT]));
}

void reconstruct(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    if (ggml_nelements(dst) == 0) {
        return;
    }
    const aquakv_cuda_layout L = make_args(dst);
    const ggml_tensor * codes = dst->src[0];
    const ggml_tensor * pred  = dst->src[2];
    const ggml_tensor * bias  = dst->src[3];
    const ggml_tensor * win   = dst->src[4];
    CUDA_CHECK(aquakv_cuda_decode(ctx.stream(), (const char *) codes->data, codes->nb[1], codes->nb[2], codes->nb[3],
                                  codes->ne[1], codes->ne[2], codes->ne[3], (char *) dst->data, dst->nb[1], dst->nb[2],
                                  dst->nb[3], (const float *) dst->src[1]->data,
                                  pred ? (const char *) pred->data : nullptr, pred ? pred->nb[1] : 0,
                                  bias ? (const float *) bias->data : nullptr, L));
    if (win && ggml_nelements(dst->src[6]) > 0) {
        // rows of dst are contiguous over (i1, i2, i3) (supports_op), so row r is at r*nb1; the
        // window rows overwrite their cells after the decode (same stream)
        CUDA_CHECK(aquakv_cuda_window_read(ctx.stream(), (const char *) win->data, win->nb[1], win->ne[1],
                                           (const int32_t *) dst->src[5]->data, (const int32_t *) dst->src[6]->data,
                                           ggml_nelements(dst->src[6]), (char *) dst->data, dst->nb[1],
                                           ggml_nrows(dst), L.n_channels));
    }
}

} // namespace

bool ggml_cuda_aquakv_supports_op(const ggml_tensor * op) {
    if (op->op == GGML_OP_AQUAKV_DECODE) {
        // the read-path ops share the op; the kind comes first, as the RoPE kind has no row layout
        switch (op->op_params[AQUAKV_P_KIND]) {
            case AQUAKV_READ_RECONSTRUCT:
                break;
            case AQUAKV_READ_ROPE_F16:
                return rope_f16_supported(op);
            default:
                return false;
        }
    }
    aquakv_row_layout l;
    if (!aquakv_make_layout(op->op_params[AQUAKV_P_N_CHANNELS], op->op_params[AQUAKV_P_GROUP_SIZE],
                            op->op_params[AQUAKV_P_GRID_DIM], op->op_params[AQUAKV_P_GRID_SIZE], &l)) {
        return false;
    }
    if (op->op == GGML_OP_AQUAKV_DECODE && (op->src[7] != nullptr || op->src[8] != nullptr)) {
        // the in-kernel up-projection (src[7]) and the whole low-rank prediction in the op
        // (ggml_aquakv_reconstruct_lowrank: down src[8], in1 src[9]) are CPU-only: on a GPU the
        // graph uses cuBLAS for the products
        return false;
    }
    if (op->op == GGML_OP_AQUAKV_DECODE && op->src[4] != nullptr &&
        (!ggml_is_contiguous(op) || op->src[4]->type != GGML_TYPE_F16)) {
        return false;  // F32 window rows (the folded value read) are CPU-only so far
    }
    return l.grid_dim <= 4 && l.grid_size*l.grid_dim <= AQUAKV_MAX_GRID_FLOATS && l.grid_size <= 256 &&
           l.n_channels/l.group_size <= AQUAKV_MAX_GROUPS && l.n_channels <= 8192;
}

void ggml_cuda_op_aquakv_store(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const aquakv_cuda_layout L = make_args(dst);
    const ggml_tensor * codes    = dst->src[0];
    const ggml_tensor * resid    = dst->src[1];
    const ggml_tensor * idx      = dst->src[2];
    const ggml_tensor * grid     = dst->src[3];
    const ggml_tensor * win      = dst->src[4];
    const ggml_tensor * win_rows = dst->src[5];
    const ggml_tensor * win_idx  = dst->src[6];
    cudaStream_t stream = ctx.stream();
    if (resid && resid->ne[1] > 0) {
        CUDA_CHECK(aquakv_cuda_encode(stream, (const char *) resid->data, resid->nb[1], resid->ne[1],
                                      (const int32_t *) idx->data, (char *) codes->data, codes->nb[1], codes->ne[1],
                                      (const float *) grid->data, L));
    }
    if (win && win_rows->ne[1] > 0) {
        CUDA_CHECK(aquakv_cuda_window(stream, (const char *) win_rows->data, win_rows->nb[1], win_rows->ne[1],
                                      (const int32_t *) win_idx->data, (char *) win->data, win->nb[1], win->ne[1],
                                      L.n_channels));
    }
}

void ggml_cuda_op_aquakv_decode(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    switch (dst->op_params[AQUAKV_P_KIND]) {
        case AQUAKV_READ_RECONSTRUCT: reconstruct(ctx, dst); break;
        case AQUAKV_READ_ROPE_F16:    rope_f16(ctx, dst);    break;
        default: GGML_ABORT("unknown AQUA-KV read kind %d", dst->op_params[AQUAKV_P_KIND]);
    }
}
