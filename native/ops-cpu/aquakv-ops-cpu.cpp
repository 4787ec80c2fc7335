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

// x̂_g = H_Gᵀ·(s·grid[code]) / G per group, codes read with a whole-word bit reader (the read
// path decodes every attended cell of every layer at every step)
void decode_row(const aquakv_row_layout & l, const grid_view & grid, const uint8_t * row, float * out) {
    const int G = l.group_size;
    const int d = l.grid_dim;
    const float inv_g = 1.0f/(float) G;
    size_t bit_pos = 0;
    for (int g0 = 0; g0 < l.n_channels; g0 += G) {
        ggml_fp16_t s16;
        std::memcpy(&s16, row + l.code_bytes + sizeof(ggml_fp16_t)*(g0/G), sizeof(s16));
        const float s = ggml_fp16_to_fp32(s16);
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
        for (int j = 0; j < G; ++j) {
            og[j] *= inv_g;
        }
    }
}

// out[0..C) += U·z with ut = Uᵀ [R, C] (row r: the C weights of z[r]); chunks of 64 outputs stay
// in registers across the R inputs
void add_up_product(float * out, const float * ut, const float * z, int C, int R) {
    constexpr int CH = 64;
    int c0 = 0;
    for (; c0 + CH <= C; c0 += CH) {
        float acc[CH];
        for (int j = 0; j < CH; ++j) {
            acc[j] = out[c0 + j];
        }
        for (int r = 0; r < R; ++r) {
            const float zr = z[r];
            const float * u = ut + (size_t) r*C + c0;
            for (int j = 0; j < CH; ++j) {
                acc[j] += u[j]*zr;
            }
        }
        for (int j = 0; j < CH; ++j) {
            out[c0 + j] = acc[j];
        }
    }
    for (int r = 0; r < R; ++r) {
        const float zr = z[r];
        const float * u = ut + (size_t) r*C;
        for (int c = c0; c < C; ++c) {
            out[c] += u[c]*zr;
        }
    }
}

// GGML_OP_AQUAKV_DECODE, plain or fused (aquakv-ops.h: ggml_aquakv_reconstruct). Each thread
// owns a contiguous range of output rows, including the window rows that land in it.
void forward_decode(const ggml_compute_params * params, ggml_tensor * dst) {
    const aquakv_row_layout l = aquakv_layout_from_op(dst);
    const ggml_tensor * codes   = dst->src[0];
    const ggml_tensor * pred    = dst->src[2];
    const ggml_tensor * bias    = dst->src[3];
    const ggml_tensor * win     = dst->src[4];
    const ggml_tensor * win_src = dst->src[5];
    const ggml_tensor * win_dst = dst->src[6];
    const ggml_tensor * up      = dst->src[7];
    const grid_view grid(dst->src[1], l.grid_dim, l.grid_size);
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
    const int R = up ? (int) up->ne[0] : 0;
    std::vector<float> ut;
    if (up) {
        ut.resize((size_t) R*C);
        for (int c = 0; c < C; ++c) {
            const char * urow = (const char *) up->data + c*up->nb[1];
            for (int r = 0; r < R; ++r) {
                ut[(size_t) r*C + c] = up->type == GGML_TYPE_F16 ? ggml_fp16_to_fp32(((const ggml_fp16_t *) urow)[r])
                                                                 : ((const float *) urow)[r];
            }
        }
    }
    const float * b = bias ? (const float *) bias->data : nullptr;

    for (int64_t r = r0; r < r1; ++r) {
        const int64_t i1 = r % n;
        const int64_t i2 = (r / n) % codes->ne[2];
        const int64_t i3 = r / (n*codes->ne[2]);
        float * out = (float *) ((char *) dst->data + i1*dst->nb[1] + i2*dst->nb[2] + i3*dst->nb[3]);
        if (slot[r - r0] >= 0) {
            ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) ((const char *) win->data + slot[r - r0]*win->nb[1]), out, C);
            continue;
        }
        const uint8_t * row = (const uint8_t *) codes->data + i1*codes->nb[1] + i2*codes->nb[2] + i3*codes->nb[3];
        decode_row(l, grid, row, out);
        if (pred) {
            const float * p = (const float *) ((const char *) pred->data + r*pred->nb[1]);
            if (up) {
                add_up_product(out, ut.data(), p, C, R);
            } else {
                for (int c = 0; c < C; ++c) {
                    out[c] += p[c];
                }
            }
        }
        if (b) {
            for (int c = 0; c < C; ++c) {
                out[c] += b[c];
            }
        }
    }
}

} // namespace

extern "C" void aquakv_compute_forward(const ggml_compute_params * params, ggml_tensor * tensor) {
    switch (tensor->op) {
        case GGML_OP_AQUAKV_STORE:  forward_store(params, tensor);  break;
        case GGML_OP_AQUAKV_DECODE: forward_decode(params, tensor); break;
        default: GGML_ABORT("not an AQUA-KV op");
    }
}
