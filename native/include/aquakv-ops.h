// AQUA-KV ggml ops (aquakv-gguf): the shared definition of the packed row layout and op
// parameters, read by the op constructors (libllama, native/src/aquakv-ops.cpp) and by the
// kernels (ggml-cpu: native/ops-cpu/aquakv-ops-cpu.cpp; ggml-cuda later).
//
// A cached row holds one token's C channels of K (or V) of one layer:
//   [ packed codes: C/d codes of `bits` bits, little-endian bitstream, ceil(C/d*bits/8) bytes ]
//   [ scales: C/G float16 group norms (unaligned: read with memcpy) ]
// Code i occupies stream bits [i*bits, (i+1)*bits), least significant bit first; stream bit k
// is bit (k mod 8) of byte (k div 8). This is aquakv_gguf.quant.higgs.pack_codes' layout.
#pragma once

#include "ggml.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// op_params (int32) of both ops
enum aquakv_op_param {
    AQUAKV_P_N_CHANNELS = 0, // C
    AQUAKV_P_GROUP_SIZE = 1, // G: power of two dividing C, multiple of d
    AQUAKV_P_GRID_DIM   = 2, // d
    AQUAKV_P_GRID_SIZE  = 3, // n points (power of two)
    AQUAKV_P_BITS       = 4, // log2(n)
    AQUAKV_P_KIND       = 5, // GGML_OP_AQUAKV_DECODE only: enum aquakv_read_kind
    AQUAKV_P_COUNT      = 6,
};

// The read-path ops share GGML_OP_AQUAKV_DECODE (so the upstream hooks stay two op entries);
// op_params[AQUAKV_P_KIND] says which one a node is. Zero is the decode / reconstruct op.
enum aquakv_read_kind {
    AQUAKV_READ_RECONSTRUCT = 0,
    AQUAKV_READ_ROPE_F16    = 1,
    AQUAKV_READ_ATTN_SUM    = 2,
};

struct aquakv_row_layout {
    int32_t n_channels;
    int32_t group_size;
    int32_t grid_dim;
    int32_t grid_size;
    int32_t bits;
    size_t  code_bytes; // packed codes at the start of the row
    size_t  row_bytes;  // codes + scales
};

static inline int32_t aquakv_log2_exact(int64_t n) {
    if (n < 2 || (n & (n - 1)) != 0) {
        return -1;
    }
    int32_t b = 0;
    while ((((int64_t) 1) << b) < n) {
        ++b;
    }
    return b;
}

// fills *out and returns 1 when the combination is valid, 0 otherwise
static inline int aquakv_make_layout(int64_t n_channels, int64_t group_size, int64_t grid_dim,
                                     int64_t grid_size, struct aquakv_row_layout * out) {
    const int32_t bits = aquakv_log2_exact(grid_size);
    if (n_channels <= 0 || grid_dim <= 0 || bits <= 0 || bits > 16 ||
        aquakv_log2_exact(group_size) < 0 || group_size % grid_dim != 0 || n_channels % group_size != 0) {
        return 0;
    }
    out->n_channels = (int32_t) n_channels;
    out->group_size = (int32_t) group_size;
    out->grid_dim   = (int32_t) grid_dim;
    out->grid_size  = (int32_t) grid_size;
    out->bits       = bits;
    out->code_bytes = (size_t) ((n_channels / grid_dim) * bits + 7) / 8;
    out->row_bytes  = out->code_bytes + sizeof(ggml_fp16_t) * (size_t) (n_channels / group_size);
    return 1;
}

static inline struct aquakv_row_layout aquakv_layout_from_op(const struct ggml_tensor * op) {
    struct aquakv_row_layout l;
    const int ok = aquakv_make_layout(op->op_params[AQUAKV_P_N_CHANNELS], op->op_params[AQUAKV_P_GROUP_SIZE],
                                      op->op_params[AQUAKV_P_GRID_DIM], op->op_params[AQUAKV_P_GRID_SIZE], &l);
    GGML_ASSERT(ok && "corrupt AQUA-KV op parameters");
    return l;
}

// Encode residual rows into packed code rows and copy f16 window rows, in one op (so that the
// window write is ordered after the reads of the window that produced the residuals).
//   codes    I8  [row_bytes, n_rows]     storage (the result is a view of it)
//   resid    F32 [C, n_enc]              rows to encode, or NULL
//   idx      I32 [n_enc]                 destination rows in `codes`
//   grid     F32 [d, n_points]
//   win      F16 [C, n_slots]            window storage, or NULL
//   win_rows F32 [C, n_win]              rows to store in the window
//   win_idx  I32 [n_win]                 destination rows in `win`
struct ggml_tensor * ggml_aquakv_store(struct ggml_context * ctx, struct ggml_tensor * codes,
                                  struct ggml_tensor * resid, struct ggml_tensor * idx,
                                  struct ggml_tensor * grid, int32_t group_size,
                                  struct ggml_tensor * win, struct ggml_tensor * win_rows,
                                  struct ggml_tensor * win_idx);

// Decode packed rows: codes I8 [row_bytes, n, m] (any row/plane stride) -> F32 [C, n, m].
struct ggml_tensor * ggml_aquakv_decode(struct ggml_context * ctx, struct ggml_tensor * codes,
                                   struct ggml_tensor * grid, int32_t n_channels, int32_t group_size);

// The fused read path of one layer and side (the same op, more sources): output row r of
// F32 [C, n, m] (r = i1 + n*i2) is
//   window row win[win_src[j]]                      when win_dst[j] = r for some j, else
//   decode(codes row) + pred[:, r] + bias
// with pred F32 [C, n*m]. Any of pred / bias / the window (win F16 or F32 [C, n_slots], win_src,
// win_dst I32 [n_w]) may be NULL.
//   src: 0 codes, 1 grid, 2 pred, 3 bias, 4 win, 5 win_src, 6 win_dst
struct ggml_tensor * ggml_aquakv_reconstruct(struct ggml_context * ctx, struct ggml_tensor * codes,
                                        struct ggml_tensor * grid, int32_t n_channels, int32_t group_size,
                                        struct ggml_tensor * pred, struct ggml_tensor * bias,
                                        struct ggml_tensor * win, struct ggml_tensor * win_src,
                                        struct ggml_tensor * win_dst);

// The low-rank read path with its whole prediction in the op: output row r is
//   window row (as in ggml_aquakv_reconstruct), else
//   decode(codes row) + up · (down · [in0[:, r] ; in1[:, r]]) + bias
// down F32/F16 ne = [C_in, R] (the stored down-projection; for values the key and value
// down-projections concatenated along ne0), in0 F32 [C, n*m], in1 F32 [C, n*m] or NULL
// (C_in = C or 2C), up F32/F16 ne = [R, C]. Neither the inner vectors nor the prediction go
// through memory.
//   src: 0 codes, 1 grid, 2 in0, 3 bias, 4 win, 5 win_src, 6 win_dst, 7 up, 8 down, 9 in1
struct ggml_tensor * ggml_aquakv_reconstruct_lowrank(struct ggml_context * ctx, struct ggml_tensor * codes,
                                                struct ggml_tensor * grid, int32_t n_channels, int32_t group_size,
                                                struct ggml_tensor * in0, struct ggml_tensor * in1,
                                                struct ggml_tensor * down, struct ggml_tensor * up,
                                                struct ggml_tensor * bias, struct ggml_tensor * win,
                                                struct ggml_tensor * win_src, struct ggml_tensor * win_dst);

// RoPE and the f16 cast of reconstructed keys in one pass:
//   x F32 [head_dim, n_head, n] (contiguous), rot F32 [head_dim, n] -> F16 [head_dim, n_head, n]
// rot is ggml_rope_ext applied to the unit pattern of `neox` (aquakv_rope_unit_pattern): for each
// rotated pair (i, j) of row t it holds rot[i] = m·cos θ, rot[j] = m·sin θ, so
//   out[i] = x[i]·rot[i] - x[j]·rot[j],  out[j] = x[i]·rot[j] + x[j]·rot[i]
// which is ggml's own rotation of the pair: the model's RoPE variant, frequency factors and
// YaRN scaling come from ggml_rope_ext once per graph instead of once per layer and head.
// Pairs are (2k, 2k+1) (neox = 0) or (k, k + head_dim/2) (neox = 1).
// With rot = NULL the node is the plain cast F32 -> F16 (values): the same kind, so both casts of
// the read path run at the bandwidth of this op rather than of ggml's generic strided copy
// (0.56 TB/s on an H200 for the value casts, docs/PERF.md).
struct ggml_tensor * ggml_aquakv_rope_f16(struct ggml_context * ctx, struct ggml_tensor * x,
                                     struct ggml_tensor * rot, int32_t neox);

// Attention-weighted sums of per-cell rows, for values folded onto the attention output
// (aquakv-graph.cpp): with the softmax weights
//   p  F32 [n_kv, n_tok, n_head, ns] (contiguous), and per-cell rows
//   y0 F32 [C0, n_kv*ns], y1 F32 [C1, n_kv*ns] or NULL (cell t of stream s is row s*n_kv + t),
// the result F32 [m, n_tok, n_head, ns] is, for query row (tok, h, s),
//   n_group = 0:  Σ_t p[t, tok, h, s] · [y0 ; y1][:, s*n_kv + t]               (m = C0 + C1)
//   n_group > 0:  Σ_t p[t, tok, h, s] · y0[g*m .. (g+1)*m, s*n_kv + t]          (m = C0/n_group)
// where g = h / (n_head/n_group) is the KV head of query head h (grouped-query attention; y1 NULL).
struct ggml_tensor * ggml_aquakv_attn_sum(struct ggml_context * ctx, struct ggml_tensor * p,
                                     struct ggml_tensor * y0, struct ggml_tensor * y1, int32_t n_group);

// the pattern whose rotation is rot above: value of channel i (0 <= i < head_dim)
static inline float aquakv_rope_unit_pattern(int64_t i, int64_t head_dim, int32_t neox) {
    return neox ? (i < head_dim/2 ? 1.0f : 0.0f) : (i % 2 == 0 ? 1.0f : 0.0f);
}

#ifdef __cplusplus
}
#endif
