// CPU kernels of the AQUA-KV ggml ops (compiled into ggml-cpu through the hook in
// ggml/src/ggml-cpu/CMakeLists.txt). Semantics: DESIGN.md §3 and aquakv_gguf/quant/higgs.py.
#include "aquakv-ops.h"

#include "ggml-cpu.h"
#include "ggml-cpu-impl.h"
#include "ggml-impl.h"

#include <algorithm>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// in-place unnormalised Sylvester Walsh-Hadamard transform of x[0..n), n a power of two
void fwht_scalar(float * x, int n) {
    for (int h = 1; h < n; h *= 2) {
        for (int i = 0; i < n; i += 2*h) {
            for (int j = i; j < i + h; ++j) {
                const float a = x[j];
                const float b = x[j + h];
                x[j]     = a + b;
                x[j + h] = a - b;
            }
        }
    }
}

#if defined(__AVX__)
// The same butterflies as fwht_scalar (each output is the same a + b or a - b of the same
// operands, so the result is bit-identical), 8 lanes at a time: the stages inside a vector by
// lane permutes and blends, the others between vectors. The scalar form's short strides do not
// vectorize and cost most of a decoded row.
void fwht(float * x, int n) {
    if (n < 8) {
        fwht_scalar(x, n);
        return;
    }
    for (int i = 0; i < n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 w = _mm256_permute_ps(v, 0xB1);                                        // h = 1
        v = _mm256_blend_ps(_mm256_add_ps(v, w), _mm256_sub_ps(w, v), 0xAA);
        w = _mm256_permute_ps(v, 0x4E);                                               // h = 2
        v = _mm256_blend_ps(_mm256_add_ps(v, w), _mm256_sub_ps(w, v), 0xCC);
        w = _mm256_permute2f128_ps(v, v, 0x01);                                       // h = 4
        v = _mm256_blend_ps(_mm256_add_ps(v, w), _mm256_sub_ps(w, v), 0xF0);
        _mm256_storeu_ps(x + i, v);
    }
    for (int h = 8; h < n; h *= 2) {
        for (int i = 0; i < n; i += 2*h) {
            for (int j = i; j < i + h; j += 8) {
                const __m256 a = _mm256_loadu_ps(x + j);
                const __m256 b = _mm256_loadu_ps(x + j + h);
                _mm256_storeu_ps(x + j,     _mm256_add_ps(a, b));
                _mm256_storeu_ps(x + j + h, _mm256_sub_ps(a, b));
            }
        }
    }
}
#else
void fwht(float * x, int n) {
    fwht_scalar(x, n);
}
#endif

struct grid_view {
    const float * g;     // [n, d]
    int           d;
    int           n;
    std::vector<float> g2;    // 2*g
    std::vector<float> gnorm; // |g|^2

    grid_view(const ggml_tensor * t, int d, int n) : g((const float *) t->data), d(d), n(n), g2(n*d), gnorm(n) {
        GGML_ASSERT(t->type == GGML_TYPE_F32 && ggml_is_contiguous(t));
        GGML_ASSERT(t->ne[0] == d && t->ne[1] == n && "AQUA-KV grid shape does not match the op parameters");
        for (int i = 0; i < n; ++i) {
            float s = 0.0f;
            for (int k = 0; k < d; ++k) {
                g2[i*d + k] = 2.0f*g[i*d + k];
                s += g[i*d + k]*g[i*d + k];
            }
            gnorm[i] = s;
        }
    }

    // argmax_i 2*y.g_i - |g_i|^2, first maximum on ties (the quantizer's rule)
    int nearest(const float * y) const {
        int   best       = 0;
        float best_score = -INFINITY;
        for (int i = 0; i < n; ++i) {
            const float * gi = g2.data() + (size_t) i*d;
            float score = y[0]*gi[0];
            for (int k = 1; k < d; ++k) {
                score += y[k]*gi[k];
            }
            score -= gnorm[i];
            if (score > best_score) {
                best_score = score;
                best       = i;
            }
        }
        return best;
    }
};

void put_bits(uint8_t * row, size_t bit_pos, uint32_t value, int bits) {
    for (int b = 0; b < bits; ++b, ++bit_pos) {
        if ((value >> b) & 1u) {
            row[bit_pos >> 3] |= (uint8_t) (1u << (bit_pos & 7));
        }
    }
}

// x: [C] float (scratch: overwritten), row: [row_bytes] output
void encode_row(const aquakv_row_layout & l, const grid_view & grid, float * x, uint8_t * row) {
    std::memset(row, 0, l.row_bytes);
    const int G = l.group_size;
    const int d = l.grid_dim;
    size_t bit_pos = 0;
    for (int g0 = 0; g0 < l.n_channels; g0 += G) {
        float * xg = x + g0;
        double ss = 0.0;
        for (int j = 0; j < G; ++j) {
            ss += (double) xg[j]*xg[j];
        }
        const ggml_fp16_t s16 = ggml_fp32_to_fp16((float) std::sqrt(ss));
        const float s = ggml_fp16_to_fp32(s16);
        std::memcpy(row + l.code_bytes + sizeof(ggml_fp16_t)*(g0/G), &s16, sizeof(s16));
        fwht(xg, G);
        if (s > 0.0f) {
            for (int j = 0; j < G; ++j) {
                xg[j] /= s;
            }
        } else {
            std::fill(xg, xg + G, 0.0f);
        }
        for (int j = 0; j < G; j += d) {
            put_bits(row, bit_pos, (uint32_t) grid.nearest(xg + j), l.bits);
            bit_pos += l.bits;
        }
    }
}

void forward_store(const ggml_compute_params * params, ggml_tensor * dst) {
    const aquakv_row_layout l = aquakv_layout_from_op(dst);
    const ggml_tensor * codes    = dst->src[0];
    const ggml_tensor * resid    = dst->src[1];
    const ggml_tensor * idx      = dst->src[2];
    const ggml_tensor * win      = dst->src[4];
    const ggml_tensor * win_rows = dst->src[5];
    const ggml_tensor * win_idx  = dst->src[6];
    const int ith = params->ith;
    const int nth = params->nth;

    if (resid) {
        const grid_view grid(dst->src[3], l.grid_dim, l.grid_size);
        std::vector<float> x(l.n_channels);
        const int64_t n_rows = codes->ne[1];
        for (int64_t r = ith; r < resid->ne[1]; r += nth) {
            const int32_t dst_row = ((const int32_t *) idx->data)[r];
            GGML_ASSERT(dst_row >= 0 && dst_row < n_rows);
            std::memcpy(x.data(), (const char *) resid->data + r*resid->nb[1], sizeof(float)*l.n_channels);
            encode_row(l, grid, x.data(), (uint8_t *) codes->data + dst_row*codes->nb[1]);
        }
    }
    if (win) {
        const int64_t n_slots = win->ne[1];
        for (int64_t r = ith; r < win_rows->ne[1]; r += nth) {
            const int32_t slot = ((const int32_t *) win_idx->data)[r];
            GGML_ASSERT(slot >= 0 && slot < n_slots);
            ggml_cpu_fp32_to_fp16((const float *) ((const char *) win_rows->data + r*win_rows->nb[1]),
                                  (ggml_fp16_t *) ((char *) win->data + slot*win->nb[1]), l.n_channels);
        }
    }
}

// stream bits [bit_pos, bit_pos + bits) of a packed row, bits <= 16: one unaligned 32-bit load
// (the bytes after the codes are the row's scales: read, then masked away)
inline uint32_t read_code(const uint8_t * row, size_t bit_pos, int bits, size_t row_bytes) {
    const size_t byte = bit_pos >> 3;
    uint32_t w = 0;
    if (byte + 4 <= row_bytes) {
        std::memcpy(&w, row + byte, 4);
    } else {
        std::memcpy(&w, row + byte, row_bytes - byte);
    }
    return (w >> (bit_pos & 7)) & ((1u << bits) - 1u);
}

// When codes never straddle a byte and every group starts on a byte (bits divides 8, G/d·bits a
// multiple of 8), a byte of codes expands to a fixed run of grid values: one table lookup per
// byte instead of a bit read per code. 256 entries of 8/bits codes × d floats.
struct byte_table {
    int n_floats = 0;  // floats per byte; 0: not applicable
    std::vector<float> t;

    byte_table(const aquakv_row_layout & l, const grid_view & grid) {
        if (8 % l.bits != 0 || (l.group_size/l.grid_dim*l.bits) % 8 != 0 || (8/l.bits)*l.grid_dim > 16) {
            return;
        }
        const int per_byte = 8/l.bits;
        n_floats = per_byte*l.grid_dim;
        t.resize((size_t) 256*n_floats);
        for (int b = 0; b < 256; ++b) {
            for (int k = 0; k < per_byte; ++k) {
                const uint32_t c = ((uint32_t) b >> (k*l.bits)) & ((1u << l.bits) - 1u);  // < 2^bits = n
                std::memcpy(&t[(size_t) b*n_floats + k*l.grid_dim], grid.g + (size_t) c*l.grid_dim, sizeof(float)*l.grid_dim);
            }
        }
    }
};

// x̂_g = H_Gᵀ·(s·grid[code]) / G per group, codes expanded a byte at a time (byte_table) or read
// with a whole-word bit reader (the read path decodes every attended cell of every layer at
// every step)
void decode_row(const aquakv_row_layout & l, const grid_view & grid, const byte_table & bt, const uint8_t * row,
                float * out) {
    const int G = l.group_size;
    const int d = l.grid_dim;
    const float inv_g = 1.0f/(float) G;
    if (bt.n_floats > 0) {
        const int F = bt.n_floats;
        const uint8_t * code = row;
        for (int g0 = 0; g0 < l.n_channels; g0 += G) {
            ggml_fp16_t s16;
            std::memcpy(&s16, row + l.code_bytes + sizeof(ggml_fp16_t)*(g0/G), sizeof(s16));
            const float s = ggml_fp16_to_fp32(s16)*inv_g;  // exact: see below
            float * og = out + g0;
#if defined(__GNUC__)
            if (F == 4) {  // 2-bit: 4-bit codes of pairs, or 8-bit codes of quadruples
                typedef float vf4 __attribute__((vector_size(16), aligned(4)));
                const vf4 sv = { s, s, s, s };
                for (int j = 0; j < G; j += 4) {
                    vf4 e;
                    std::memcpy(&e, bt.t.data() + (size_t) (*code++)*4, sizeof(e));
                    e *= sv;
                    std::memcpy(og + j, &e, sizeof(e));
                }
                fwht(og, G);
                continue;
            }
#endif
            for (int j = 0; j < G; j += F) {
                const float * e = bt.t.data() + (size_t) (*code++)*F;
                for (int k = 0; k < F; ++k) {
                    og[j + k] = s*e[k];
                }
            }
            fwht(og, G);
        }
        return;
    }
    size_t bit_pos = 0;
    for (int g0 = 0; g0 < l.n_channels; g0 += G) {
        ggml_fp16_t s16;
        std::memcpy(&s16, row + l.code_bytes + sizeof(ggml_fp16_t)*(g0/G), sizeof(s16));
        // (s/G)·g before the transform: G is a power of two, so this is exactly H·(s·g)/G
        // (scaling by 2^-k commutes with every rounding) in one pass less
        const float s = ggml_fp16_to_fp32(s16)*inv_g;
        float * og = out + g0;
        for (int j = 0; j < G; j += d) {
            const uint32_t c = read_code(row, bit_pos, l.bits, l.row_bytes);  // < 2^bits = n
            bit_pos += l.bits;
            const float * gc = grid.g + (size_t) c*d;
            for (int k = 0; k < d; ++k) {
                og[j + k] = s*gc[k];
            }
        }
        fwht(og, G);
    }
}

// A low-rank predictor's weights, converted once per op call and thread into the layouts the
// products below stream: dt = Dᵀ [C_in][RP] and ut = Uᵀ [R][C], RP = R rounded up to a vector
// (the padding columns are zero, so z's padding lanes stay zero).
struct lowrank_weights {
    int C    = 0;
    int C_in = 0;
    int R    = 0;
    int RP   = 0;
    std::vector<float> dt;
    std::vector<float> ut;
};

#if defined(__GNUC__)
// 16 floats in whatever registers the target has (one zmm, two ymm, four xmm): the compiler
// lowers the products below to the widest FMA of the -march it builds for
typedef float vf16 __attribute__((vector_size(64), aligned(4)));
constexpr int VL = 16;
inline vf16 vload(const float * p) { vf16 v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void vstore(float * p, vf16 v) { std::memcpy(p, &v, sizeof(v)); }
#if defined(__AVX512F__)
constexpr int TILE = 8;  // rows per tile: 8 accumulators + operands fit 32 zmm
#else
constexpr int TILE = 4;  // 4 x 2 ymm accumulators + operands fit 16 ymm
#endif
#else
constexpr int VL   = 1;
constexpr int TILE = 4;
#endif

// row i1 of a contiguous F16/F32 weight as floats (the vectorized row conversion: the weights
// are converted at every op call, once per thread)
void weight_row(const ggml_tensor * w, int64_t i1, float * out) {
    const char * p = (const char *) w->data + i1*w->nb[1];
    if (w->type == GGML_TYPE_F16) {
        ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) p, out, w->ne[0]);
    } else {
        std::memcpy(out, p, sizeof(float)*w->ne[0]);
    }
}

lowrank_weights make_lowrank_weights(const ggml_tensor * down, const ggml_tensor * up, int C) {
    lowrank_weights w;
    w.C    = C;
    w.C_in = (int) down->ne[0];
    w.R    = (int) up->ne[0];
    w.RP   = (w.R + VL - 1)/VL*VL;
    w.dt.assign((size_t) w.C_in*w.RP, 0.0f);
    std::vector<float> row(std::max(w.C_in, w.R));
    for (int r = 0; r < w.R; ++r) {
        weight_row(down, r, row.data());
        for (int c = 0; c < w.C_in; ++c) {
            w.dt[(size_t) c*w.RP + r] = row[c];
        }
    }
    w.ut.resize((size_t) w.R*C);
    for (int c = 0; c < C; ++c) {
        weight_row(up, c, row.data());
        for (int r = 0; r < w.R; ++r) {
            w.ut[(size_t) r*C + c] = row[r];
        }
    }
    return w;
}

// z[t][0..RP) = D·x_t for the nt <= TILE rows of a tile; x_t is [in0_t ; in1_t] (in1 optional)
void down_products(const lowrank_weights & w, const float * const * in0, const float * const * in1, int nt,
                   float * z /* [TILE][RP] */) {
    const int C = w.C;
#if defined(__GNUC__)
    for (int rb = 0; rb < w.RP; rb += VL) {
        vf16 acc[TILE];
        for (int t = 0; t < TILE; ++t) {
            acc[t] = vf16{};
        }
        for (int part = 0; part < (in1 ? 2 : 1); ++part) {
            const float * const * in = part == 0 ? in0 : in1;
            const float * dt = w.dt.data() + (size_t) part*C*w.RP + rb;
            for (int c = 0; c < C; ++c) {
                const vf16 d = vload(dt + (size_t) c*w.RP);
                for (int t = 0; t < TILE; ++t) {
                    acc[t] += (t < nt ? in[t][c] : 0.0f)*d;
                }
            }
        }
        for (int t = 0; t < TILE; ++t) {
            vstore(z + (size_t) t*w.RP + rb, acc[t]);
        }
    }
#else
    for (int t = 0; t < nt; ++t) {
        for (int r = 0; r < w.RP; ++r) {
            float acc = 0.0f;
            for (int part = 0; part < (in1 ? 2 : 1); ++part) {
                const float * x = part == 0 ? in0[t] : in1[t];
                for (int c = 0; c < C; ++c) {
                    acc += x[c]*w.dt[((size_t) part*C + c)*w.RP + r];
                }
            }
            z[(size_t) t*w.RP + r] = acc;
        }
    }
#endif
}

// out_t[0..C) += U·z_t (+ bias) for the nt rows of a tile, the C outputs a vector at a time in
// registers across the R inputs
void up_products(const lowrank_weights & w, const float * z, const float * bias, float * const * out, int nt) {
    const int C = w.C;
    int c0 = 0;
#if defined(__GNUC__)
    for (; c0 + VL <= C; c0 += VL) {
        vf16 acc[TILE];
        const vf16 b = bias ? vload(bias + c0) : vf16{};
        for (int t = 0; t < TILE; ++t) {
            acc[t] = t < nt ? vload(out[t] + c0) + b : vf16{};
        }
        for (int r = 0; r < w.R; ++r) {
            const vf16 u = vload(w.ut.data() + (size_t) r*C + c0);
            for (int t = 0; t < TILE; ++t) {
                acc[t] += z[(size_t) t*w.RP + r]*u;
            }
        }
        for (int t = 0; t < nt; ++t) {
            vstore(out[t] + c0, acc[t]);
        }
    }
#endif
    for (int t = 0; t < nt; ++t) {
        for (int c = c0; c < C; ++c) {
            float acc = out[t][c] + (bias ? bias[c] : 0.0f);
            for (int r = 0; r < w.R; ++r) {
                acc += z[(size_t) t*w.RP + r]*w.ut[(size_t) r*C + c];
            }
            out[t][c] = acc;
        }
    }
}

// GGML_OP_AQUAKV_DECODE, plain or fused (aquakv-ops.h: ggml_aquakv_reconstruct and
// ggml_aquakv_reconstruct_lowrank). Each thread owns a contiguous range of output rows,
// including the window rows that land in it, and works through it a tile of rows at a time.
void forward_decode(const ggml_compute_params * params, ggml_tensor * dst) {
    const aquakv_row_layout l = aquakv_layout_from_op(dst);
    const ggml_tensor * codes   = dst->src[0];
    const ggml_tensor * pred    = dst->src[2];  // the prediction, its inner vectors, or in0 (with down)
    const ggml_tensor * bias    = dst->src[3];
    const ggml_tensor * win     = dst->src[4];
    const ggml_tensor * win_src = dst->src[5];
    const ggml_tensor * win_dst = dst->src[6];
    const ggml_tensor * up      = dst->src[7];
    const ggml_tensor * down    = dst->src[8];
    const ggml_tensor * in1     = dst->src[9];
    const grid_view grid(dst->src[1], l.grid_dim, l.grid_size);
    const byte_table bt(l, grid);
    const int C = l.n_channels;
    const int64_t n  = codes->ne[1];
    const int64_t nr = n*codes->ne[2]*codes->ne[3];
    const int64_t per_thread = (nr + params->nth - 1)/params->nth;
    const int64_t r0 = std::min<int64_t>(nr, per_thread*params->ith);
    const int64_t r1 = std::min<int64_t>(nr, r0 + per_thread);
    if (r0 >= r1) {
        return;
    }

    // window slot of each owned row (-1: decode it)
    std::vector<int32_t> slot(r1 - r0, -1);
    if (win) {
        const int32_t * src = (const int32_t *) win_src->data;
        const int32_t * dsr = (const int32_t *) win_dst->data;
        for (int64_t j = 0; j < ggml_nelements(win_dst); ++j) {
            GGML_ASSERT(dsr[j] >= 0 && dsr[j] < nr && src[j] >= 0 && src[j] < win->ne[1] && "AQUA-KV window index");
            if (dsr[j] >= r0 && dsr[j] < r1) {
                slot[dsr[j] - r0] = src[j];
            }
        }
    }
    // with `down` (and `up`) the whole low-rank prediction is computed here; without it `pred`
    // is the prediction
    GGML_ASSERT((up == nullptr) == (down == nullptr) && "AQUA-KV low-rank read needs both projections");
    const lowrank_weights w = down ? make_lowrank_weights(down, up, C) : lowrank_weights{};
    const float * b = bias ? (const float *) bias->data : nullptr;
    auto row_of = [](const ggml_tensor * t, int64_t r) { return (const float *) ((const char *) t->data + r*t->nb[1]); };

    std::vector<float> z((size_t) TILE*std::max(w.RP, 1));
    for (int64_t t0 = r0; t0 < r1; t0 += TILE) {
        const int nt = (int) std::min<int64_t>(TILE, r1 - t0);
        float * out[TILE];
        const float * x0[TILE];
        const float * x1[TILE];
        for (int t = 0; t < nt; ++t) {
            const int64_t r  = t0 + t;
            const int64_t i1 = r % n;
            const int64_t i2 = (r / n) % codes->ne[2];
            const int64_t i3 = r / (n*codes->ne[2]);
            out[t] = (float *) ((char *) dst->data + i1*dst->nb[1] + i2*dst->nb[2] + i3*dst->nb[3]);
            const uint8_t * row = (const uint8_t *) codes->data + i1*codes->nb[1] + i2*codes->nb[2] + i3*codes->nb[3];
            // a window row is not decoded (its codes are stale or zero); the tile's products still
            // run over it (rows are independent) and the window row overwrites the result below
            if (slot[r - r0] < 0) {
                decode_row(l, grid, bt, row, out[t]);
            }
            x0[t] = pred ? row_of(pred, r) : nullptr;
            x1[t] = in1 ? row_of(in1, r) : nullptr;
        }
        if (down) {
            down_products(w, x0, in1 ? x1 : nullptr, nt, z.data());
            up_products(w, z.data(), b, out, nt);
        } else {
            for (int t = 0; t < nt; ++t) {
                if (pred) {
                    for (int c = 0; c < C; ++c) {
                        out[t][c] += x0[t][c];
                    }
                }
                if (b) {
                    for (int c = 0; c < C; ++c) {
                        out[t][c] += b[c];
                    }
                }
            }
        }
        for (int t = 0; t < nt; ++t) {
            const int32_t s_idx = slot[t0 + t - r0];
            if (s_idx >= 0) {
                const char * w_row = (const char *) win->data + s_idx*win->nb[1];
                if (win->type == GGML_TYPE_F16) {
                    ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) w_row, out[t], C);
                } else {
                    std::memcpy(out[t], w_row, sizeof(float)*C);
                }
            }
        }
    }
}

// AQUAKV_READ_ROPE_F16 (aquakv-ops.h: ggml_aquakv_rope_f16): rows t of x split over threads
void forward_rope_f16(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * x   = dst->src[0];
    const ggml_tensor * rot = dst->src[1];
    const bool neox = dst->op_params[AQUAKV_P_COUNT] != 0;
    const int64_t hd = x->ne[0];
    const int64_t nh = x->ne[1];
    const int64_t nt = x->ne[2];
    const int64_t half = hd/2;
    if (rot == nullptr) {  // the plain cast
        const int64_t n_rows = nh*nt;
        for (int64_t r = params->ith; r < n_rows; r += params->nth) {
            ggml_cpu_fp32_to_fp16((const float *) x->data + r*hd, (ggml_fp16_t *) dst->data + r*hd, hd);
        }
        return;
    }
    std::vector<float> tmp(hd);
    for (int64_t t = params->ith; t < nt; t += params->nth) {
        const float * rt = (const float *) rot->data + t*hd;
        for (int64_t h = 0; h < nh; ++h) {
            const float * xr = (const float *) ((const char *) x->data + h*x->nb[1] + t*x->nb[2]);
            if (neox) {
                for (int64_t k = 0; k < half; ++k) {
                    const float x0 = xr[k], x1 = xr[k + half];
                    const float c = rt[k], sn = rt[k + half];
                    tmp[k]        = x0*c - x1*sn;
                    tmp[k + half] = x0*sn + x1*c;
                }
            } else {
                for (int64_t k = 0; k < hd; k += 2) {
                    const float x0 = xr[k], x1 = xr[k + 1];
                    const float c = rt[k], sn = rt[k + 1];
                    tmp[k]     = x0*c - x1*sn;
                    tmp[k + 1] = x0*sn + x1*c;
                }
            }
            ggml_cpu_fp32_to_fp16(tmp.data(), (ggml_fp16_t *) ((char *) dst->data + h*dst->nb[1] + t*dst->nb[2]), hd);
        }
    }
}

// AQUAKV_READ_ATTN_SUM (aquakv-ops.h: ggml_aquakv_attn_sum). The query rows of one KV group
// (rows tok + n_tok*h for the heads h of group g) read the same channels of every cell, so a
// work item is a tile of ATT_RT such rows x up to ATT_CT vectors of channels, its accumulators
// in registers while it streams over the cells once; items are dealt to the threads in turn.
constexpr int ATT_RT = 6;
constexpr int ATT_CT = 4;

struct attn_sum_item {
    const float * y;       // channel c0 of cell 0 of the item's source rows
    size_t        y_nb1;   // bytes between cells
    const float * p[ATT_RT];  // weights of the item's rows (padding rows repeat the last one)
    float       * out[ATT_RT];
    int           nr;      // real rows
    int           nc;      // channels (<= ATT_CT*VL)
};

template <int CT>
void attn_sum_tile(const attn_sum_item & it, int64_t n_kv) {
#if defined(__GNUC__)
    vf16 acc[ATT_RT][CT];
    for (int r = 0; r < ATT_RT; ++r) {
        for (int c = 0; c < CT; ++c) {
            acc[r][c] = vf16{};
        }
    }
    const char * yb = (const char *) it.y;
    for (int64_t t = 0; t < n_kv; ++t) {
        const float * yt = (const float *) (yb + t*it.y_nb1);
        vf16 yv[CT];
        for (int c = 0; c < CT; ++c) {
            yv[c] = vload(yt + c*VL);
        }
        for (int r = 0; r < ATT_RT; ++r) {
            const float a = it.p[r][t];
            for (int c = 0; c < CT; ++c) {
                acc[r][c] += a*yv[c];
            }
        }
    }
    for (int r = 0; r < it.nr; ++r) {
        for (int c = 0; c < CT; ++c) {
            vstore(it.out[r] + c*VL, acc[r][c]);
        }
    }
#else
    GGML_UNUSED(it); GGML_UNUSED(n_kv);
#endif
}

void attn_sum_scalar(const attn_sum_item & it, int64_t n_kv, int c_begin) {
    for (int r = 0; r < it.nr; ++r) {
        for (int c = c_begin; c < it.nc; ++c) {
            float acc = 0.0f;
            for (int64_t t = 0; t < n_kv; ++t) {
                acc += it.p[r][t]*((const float *) ((const char *) it.y + t*it.y_nb1))[c];
            }
            it.out[r][c] = acc;
        }
    }
}

void forward_attn_sum(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * p  = dst->src[0];
    const int32_t n_group = dst->op_params[AQUAKV_P_COUNT];
    const int64_t n_kv = p->ne[0], n_tok = p->ne[1], n_head = p->ne[2], ns = p->ne[3];
    const int64_t m = dst->ne[0];
    const int64_t n_groups = n_group > 0 ? n_group : 1;
    const int64_t rows_per_group = n_tok*(n_head/n_groups);
    const int64_t n_row_tiles = (rows_per_group + ATT_RT - 1)/ATT_RT;
    const int64_t ch_tile = (int64_t) ATT_CT*VL;
    // the output channels come from one or two sources (y0, then y1); a tile never straddles them
    struct segment { const ggml_tensor * y; int64_t out_off, len, n_tiles; };
    std::vector<segment> segs;
    for (int i = 1; i <= 2; ++i) {
        const ggml_tensor * y = dst->src[i];
        if (y) {
            const int64_t len = n_group > 0 ? m : y->ne[0];
            segs.push_back({ y, segs.empty() ? 0 : segs[0].len, len, (len + ch_tile - 1)/ch_tile });
        }
    }
    int64_t n_ch_tiles = 0;
    for (const segment & sg : segs) {
        n_ch_tiles += sg.n_tiles;
    }
    const int64_t n_items = ns*n_groups*n_row_tiles*n_ch_tiles;
    for (int64_t item = params->ith; item < n_items; item += params->nth) {
        int64_t ct = item % n_ch_tiles;
        const int64_t rt = (item / n_ch_tiles) % n_row_tiles;
        const int64_t g  = (item / (n_ch_tiles*n_row_tiles)) % n_groups;
        const int64_t s  = item / (n_ch_tiles*n_row_tiles*n_groups);
        size_t si = 0;
        while (ct >= segs[si].n_tiles) {
            ct -= segs[si++].n_tiles;
        }
        const segment & sg = segs[si];
        const int64_t c0 = ct*ch_tile;  // within the segment
        const int64_t in_off = (n_group > 0 ? g*m : 0) + c0;
        attn_sum_item it;
        it.y     = (const float *) ((const char *) sg.y->data + s*n_kv*sg.y->nb[1]) + in_off;
        it.y_nb1 = sg.y->nb[1];
        it.nc    = (int) (std::min(sg.len, c0 + ch_tile) - c0);
        it.nr    = (int) std::min<int64_t>(ATT_RT, rows_per_group - rt*ATT_RT);
        for (int r = 0; r < ATT_RT; ++r) {
            const int64_t row = g*rows_per_group + rt*ATT_RT + std::min(r, it.nr - 1);  // tok + n_tok*h
            const int64_t tok = row % n_tok, h = row / n_tok;
            it.p[r]   = (const float *) ((const char *) p->data + tok*p->nb[1] + h*p->nb[2] + s*p->nb[3]);
            it.out[r] = (float *) ((char *) dst->data + tok*dst->nb[1] + h*dst->nb[2] + s*dst->nb[3]) + sg.out_off + c0;
        }
        int done = 0;
#if defined(__GNUC__)
        switch (it.nc/VL) {
            case 0: break;
            case 1: attn_sum_tile<1>(it, n_kv); break;
            case 2: attn_sum_tile<2>(it, n_kv); break;
            case 3: attn_sum_tile<3>(it, n_kv); break;
            default: attn_sum_tile<4>(it, n_kv); break;
        }
        done = it.nc/VL*VL;
#endif
        if (done < it.nc) {
            attn_sum_scalar(it, n_kv, done);
        }
    }
}

} // namespace

extern "C" void aquakv_compute_forward(const ggml_compute_params * params, ggml_tensor * tensor) {
    switch (tensor->op) {
        case GGML_OP_AQUAKV_STORE:  forward_store(params, tensor);  break;
        case GGML_OP_AQUAKV_DECODE:
            if (tensor->op_params[AQUAKV_P_KIND] == AQUAKV_READ_ROPE_F16) {
                forward_rope_f16(params, tensor);
            } else if (tensor->op_params[AQUAKV_P_KIND] == AQUAKV_READ_ATTN_SUM) {
                forward_attn_sum(params, tensor);
            } else {
                forward_decode(params, tensor);
            }
            break;
        default: GGML_ABORT("not an AQUA-KV op");
    }
}
