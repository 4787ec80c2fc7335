// CUDA kernels of the AQUA-KV ggml ops: the same semantics as the CPU kernels
// (native/ops-cpu/aquakv-ops-cpu.cpp, DESIGN.md §3). The encode kernel (new tokens only) and the
// reference decode kernel use one thread block per row: the row lives in shared memory for the group
// norms, the in-place Walsh-Hadamard butterflies and the grid search. The decode kernel of the read
// path (every attended cell of every layer at every step) uses one warp per row instead, with the
// transform in registers and warp shuffles (aquakv_decode_warp_kernel below).
// Plain CUDA (shared memory, __syncthreads, warp shuffles, shared-memory float atomics): nothing
// Hopper-only, so the code builds for sm_75 and later. Self-contained (no ggml-cuda headers), so
// that nvcc alone compiles it (CI checks that).
#include "aquakv-kernels.cuh"

#include <cuda_fp16.h>
#include <math_constants.h>

namespace {

constexpr int AQUAKV_BLOCK = 256;


// in-place unnormalised Sylvester transform of every group of G consecutive values of x[0..C)
__device__ void block_fwht(float * x, int C, int G) {
    for (int h = 1; h < G; h *= 2) {
        for (int p = threadIdx.x; p < C/2; p += blockDim.x) {
            const int j = (p / h)*2*h + (p % h);  // blocks of 2h never straddle a group
            const float a = x[j];
            const float b = x[j + h];
            x[j]     = a + b;
            x[j + h] = a - b;
        }
        __syncthreads();
    }
}

__device__ void load_grid(const float * grid, float * s_grid, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        s_grid[i] = grid[i];
    }
}

// encode rows of resid into packed rows of codes at rows idx[r]
__global__ void aquakv_encode_kernel(const char * resid, size_t resid_nb1, const int32_t * idx, char * codes,
                                     size_t codes_nb1, int64_t n_rows_codes, const float * grid, aquakv_cuda_layout L) {
    extern __shared__ float smem[];
    float *    x      = smem;                          // [C]
    float *    s_grid = x + L.n_channels;              // [n*d]
    float *    s_gn   = s_grid + AQUAKV_MAX_GRID_FLOATS;  // [n]: |g|^2
    // [C/G] group sums of squares, in double like the CPU kernel: a float sum in another order
    // rounds to another f16 norm for ~0.2% of 1024-channel groups
    double *   s_ss   = (double *) (s_gn + 256);
    uint32_t * s_code = (uint32_t *) (s_ss + AQUAKV_MAX_GROUPS);  // [C/d]

    const int r = blockIdx.x;
    const int C = L.n_channels, G = L.group_size, d = L.grid_dim, n = L.grid_size;
    const float * src = (const float *) (resid + r*resid_nb1);
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        x[i] = src[i];
    }
    load_grid(grid, s_grid, n*d);
    for (int g = threadIdx.x; g < C/G; g += blockDim.x) {
        s_ss[g] = 0.0;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float s = 0.0f;
        for (int k = 0; k < d; ++k) {
            s += s_grid[i*d + k]*s_grid[i*d + k];
        }
        s_gn[i] = s;
    }
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        atomicAdd(&s_ss[i / G], (double) x[i]*x[i]);
    }
    __syncthreads();
    block_fwht(x, C, G);

    const int32_t dst_row = idx[r];
    if (dst_row < 0 || dst_row >= n_rows_codes) {
        return;  // the host checks indices; never write outside the storage
    }
    uint8_t * row = (uint8_t *) (codes + dst_row*codes_nb1);
    for (int p = threadIdx.x; p < C/d; p += blockDim.x) {
        // the rounded f16 norm is the divisor, as on the CPU; a zero group codes y = 0
        const float s = __half2float(__float2half_rn((float) sqrt(s_ss[(p*d) / G])));
        float y[4];
        for (int k = 0; k < d && k < 4; ++k) {
            y[k] = s > 0.0f ? x[p*d + k]/s : 0.0f;
        }
        int   best = 0;
        float best_score = -CUDART_INF_F;
        for (int i = 0; i < n; ++i) {
            float score = y[0]*(2.0f*s_grid[i*d]);
            for (int k = 1; k < d && k < 4; ++k) {
                score += y[k]*(2.0f*s_grid[i*d + k]);
            }
            score -= s_gn[i];
            if (score > best_score) {  // first maximum wins ties
                best_score = score;
                best = i;
            }
        }
        s_code[p] = (uint32_t) best;
    }
    __syncthreads();
    // one writer per byte: the packed codes (little-endian bitstream, byte k holds stream bits
    // [8k, 8k+8)), then the f16 group norms, low byte first
    for (int k = threadIdx.x; k < L.row_bytes; k += blockDim.x) {
        uint32_t byte = 0;
        if (k < L.code_bytes) {
            for (int b = 0; b < 8; ++b) {
                const int bit = 8*k + b;
                const int c = bit / L.bits;
                if (c < C/d) {
                    byte |= ((s_code[c] >> (bit % L.bits)) & 1u) << b;
                }
            }
        } else {
            const int g = (k - L.code_bytes) / 2;
            const uint32_t u = (uint32_t) __half_as_ushort(__float2half_rn((float) sqrt(s_ss[g])));
            byte = ((k - L.code_bytes) % 2 == 0) ? (u & 0xffu) : (u >> 8);
        }
        row[k] = (uint8_t) byte;
    }
}

__global__ void aquakv_window_kernel(const char * rows, size_t rows_nb1, const int32_t * idx, char * win,
                                     size_t win_nb1, int64_t n_slots, int C) {
    const int r = blockIdx.x;
    const int32_t slot = idx[r];
    if (slot < 0 || slot >= n_slots) {
        return;
    }
    const float * src = (const float *) (rows + r*rows_nb1);
    half * dst = (half *) (win + slot*win_nb1);
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        dst[i] = __float2half(src[i]);
    }
}

// the reference decode kernel (aquakv_cuda_decode_reference): one block per row, the transform in
// shared memory; the warp kernel below replaces it wherever the layout allows
__global__ void aquakv_decode_kernel(const char * codes, size_t nb1, size_t nb2, size_t nb3, int64_t ne1, int64_t ne2,
                                     char * out, size_t onb1, size_t onb2, size_t onb3, const float * grid,
                                     const char * pred, size_t pred_nb1, const float * bias, aquakv_cuda_layout L) {
    extern __shared__ float smem[];
    float * x      = smem;              // [C]
    float * s_grid = x + L.n_channels;  // [n*d]

    const int64_t r  = blockIdx.x;
    const int64_t i1 = r % ne1;
    const int64_t i2 = (r / ne1) % ne2;
    const int64_t i3 = r / (ne1*ne2);
    const uint8_t * row = (const uint8_t *) (codes + i1*nb1 + i2*nb2 + i3*nb3);
    const int C = L.n_channels, G = L.group_size, d = L.grid_dim;

    load_grid(grid, s_grid, L.grid_size*d);
    __syncthreads();
    for (int p = threadIdx.x; p < C/d; p += blockDim.x) {
        uint32_t c = 0;
        for (int b = 0; b < L.bits; ++b) {
            const int bit = p*L.bits + b;
            c |= (uint32_t) ((row[bit >> 3] >> (bit & 7)) & 1u) << b;
        }
        const int g = (p*d) / G;
        const uint16_t bits16 = (uint16_t) row[L.code_bytes + 2*g] | ((uint16_t) row[L.code_bytes + 2*g + 1] << 8);
        const float s = __half2float(__ushort_as_half(bits16));
        c = c < (uint32_t) L.grid_size ? c : 0;
        for (int k = 0; k < d; ++k) {
            x[p*d + k] = s*s_grid[c*d + k];
        }
    }
    __syncthreads();
    block_fwht(x, C, G);
    float * dst = (float *) (out + i1*onb1 + i2*onb2 + i3*onb3);
    const float inv_g = 1.0f/(float) G;
    const float * p = pred ? (const float *) (pred + r*pred_nb1) : nullptr;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float v = x[i]*inv_g;
        if (p) {
            v += p[i];
        }
        if (bias) {
            v += bias[i];
        }
        dst[i] = v;
    }
}

// --- the read path's decode kernel: one warp per row ------------------------------------------
//
// The kernel above spends its time in the __syncthreads between the shared-memory butterflies
// (docs/PERF.md: 79 M rows/s for the 8B shape, ~2M rows per token). Here a warp owns a row and the
// transform stays in registers. A row is cut into strips of 128 channels and lane l holds channels
// 4l..4l+3 of each strip, so every float load and store is one float4 per lane, 512 contiguous
// bytes per warp. With channel c = 128·k + 4·l + j the partners (c, c + h) of butterfly stage h are
//   h = 1, 2       the same lane (j, j + h):          registers
//   h = 4 .. 64    lanes l, l ^ h/4:                  __shfl_xor_sync
//   h >= 128       strips k, k + h/128 of the lane:   registers
// A warp holds S strips at once, S·128 a multiple of G, so every group of the set is complete;
// G >= 4, so a lane's four channels share one group norm.
//
// Bit-identical to aquakv_decode_kernel: every stage h computes the same a + b and a - b of the same
// operands (the upper lane of a shuffled pair computes partner - own, which is a - b), the stages
// run in the same order h = 1, 2, 4, .., G/2, and the products are spelled with __fmul_rn / __fmaf_rn
// (grid_point, decode_finish) so that nvcc's contraction choices cannot differ between the kernels.
//
// The codes: strip k holds 128/d codes, 32 lane chunks of cb = 4·bits/d bits (d divides the four
// channels of a lane: d is a power of two dividing G, at most 4), so lane l's codes are stream bits
// [(32k + l)·cb, +cb): one or two whole-word loads, the warp's together a contiguous 4·cb bytes.

constexpr int AQUAKV_DEC_WARPS = 8;   // rows decoded at once by a block
constexpr int AQUAKV_DEC_ROWS  = 32;  // rows of a block: the grid goes to shared memory once per 32 rows

// stream bits [pos, pos + n), n <= 32, of a packed row, in the low bits of the result (higher bits
// are garbage): the one or two aligned 32-bit words holding them. Rows need not be 4-byte aligned
// (one group per row makes row_bytes 2 mod 4); an aligned word that holds a byte of the row stays
// inside the allocation (ggml's buffers are aligned and padded), though it may take up to 3 bytes
// of a neighbouring row.
__device__ __forceinline__ uint32_t read_bits(const uint8_t * row, uint32_t pos, uint32_t n) {
    const uintptr_t  a     = (uintptr_t) row + (pos >> 3);
    const uint32_t * w     = (const uint32_t *) (a & ~(uintptr_t) 3);
    const uint32_t   shift = 8*(uint32_t) (a & 3) + (pos & 7);
    const uint32_t   lo    = __ldg(w);
    const uint32_t   hi    = shift + n > 32 ? __ldg(w + 1) : 0u;
    return __funnelshift_r(lo, hi, shift);
}

// s·grid[c] for the D channels of one code (__fmul_rn: the product is rounded on its own, as the
// reference kernel's store to shared memory does, never contracted into a butterfly's add)
template <int D>
__device__ __forceinline__ void grid_point(const float * s_grid, uint32_t c, float s, float * x) {
    if constexpr (D == 4) {
        const float4 g = ((const float4 *) s_grid)[c];
        x[0] = __fmul_rn(s, g.x); x[1] = __fmul_rn(s, g.y); x[2] = __fmul_rn(s, g.z); x[3] = __fmul_rn(s, g.w);
    } else if constexpr (D == 2) {
        const float2 g = ((const float2 *) s_grid)[c];
        x[0] = __fmul_rn(s, g.x); x[1] = __fmul_rn(s, g.y);
    } else {
        x[0] = __fmul_rn(s, s_grid[c]);
    }
}

__device__ __forceinline__ void butterfly(float & a, float & b) {
    const float x = a;
    const float y = b;
    a = x + y;
    b = x - y;
}

// x/G (+ pred) (+ bias) as the reference kernel computes it: nvcc contracts its `v = x*inv_g;
// v += p[i]` (and, without a prediction, `v += bias[i]`) into one fma (see its PTX), the bias after
// a prediction is a separate add. 1/G is a power of two, so x/G is exact and the fma rounds like the
// plain sum; spelling it out keeps the two kernels equal even for results below FLT_MIN.
__device__ __forceinline__ float decode_finish(float x, float inv_g, bool has_p, float p, bool has_b, float b) {
    if (has_p) {
        const float v = __fmaf_rn(x, inv_g, p);
        return has_b ? __fadd_rn(v, b) : v;
    }
    return has_b ? __fmaf_rn(x, inv_g, b) : __fmul_rn(x, inv_g);
}

// one row of codes per warp, AQUAKV_DEC_ROWS rows per block; D = grid_dim, S = strips per set
template <int D, int S>
__global__ void __launch_bounds__(AQUAKV_DEC_WARPS*32)
aquakv_decode_warp_kernel(const char * __restrict__ codes, size_t nb1, size_t nb2, size_t nb3, int64_t ne1,
                          int64_t ne2, int64_t n_rows, char * __restrict__ out, size_t onb1, size_t onb2,
                          size_t onb3, const float * __restrict__ grid, const char * __restrict__ pred,
                          size_t pred_nb1, const float * __restrict__ bias, aquakv_cuda_layout L) {
    __shared__ __align__(16) float s_grid[AQUAKV_MAX_GRID_FLOATS];
    for (int i = threadIdx.x; i < L.grid_size*D; i += blockDim.x) {
        s_grid[i] = grid[i];
    }
    __syncthreads();  // the only block-wide barrier: from here on each warp works alone

    const int      lane  = threadIdx.x % 32;
    const int      C     = L.n_channels;
    const int      G     = L.group_size;
    const int      lg_g  = __ffs(G) - 1;  // G is a power of two
    const int      bits  = L.bits;
    const uint32_t cb    = 4*bits/D;
    const uint32_t cmask = (1u << bits) - 1u;
    const float    inv_g = 1.0f/(float) G;
    const bool     has_p = pred != nullptr;
    const bool     has_b = bias != nullptr;
    const int64_t  r1    = min(n_rows, ((int64_t) blockIdx.x + 1)*AQUAKV_DEC_ROWS);
    for (int64_t r = (int64_t) blockIdx.x*AQUAKV_DEC_ROWS + threadIdx.x/32; r < r1; r += AQUAKV_DEC_WARPS) {
        int64_t i1, i2, i3;
        if (n_rows <= UINT32_MAX) {  // 32-bit divisions (warp-uniform branch)
            const uint32_t r32 = (uint32_t) r, n1 = (uint32_t) ne1, n2 = (uint32_t) ne2;
            i1 = r32 % n1;
            i2 = (r32 / n1) % n2;
            i3 = r32 / (n1*n2);
        } else {
            i1 = r % ne1;
            i2 = (r / ne1) % ne2;
            i3 = r / (ne1*ne2);
        }
        const uint8_t * row = (const uint8_t *) (codes + i1*nb1 + i2*nb2 + i3*nb3);
        float *         dst = (float *) (out + i1*onb1 + i2*onb2 + i3*onb3);
        const float *   p   = has_p ? (const float *) (pred + r*pred_nb1) : nullptr;

        for (int k0 = 0; k0 < C/128; k0 += S) {
            // the prediction is loaded first: its latency hides behind the transform
            float4 pv[S];
#pragma unroll
            for (int s = 0; s < S; ++s) {
                pv[s] = has_p ? __ldg((const float4 *) (p + 128*(k0 + s) + 4*lane)) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
            float v[S][4];
#pragma unroll
            for (int s = 0; s < S; ++s) {
                const int      k  = k0 + s;
                const uint32_t w  = read_bits(row, (uint32_t) (32*k + lane)*cb, cb);
                const int      g  = (128*k + 4*lane) >> lg_g;  // G >= 4: one group per lane chunk
                const float    sc = __half2float(__ushort_as_half(
                    (unsigned short) (row[L.code_bytes + 2*g] | (row[L.code_bytes + 2*g + 1] << 8))));
#pragma unroll
                for (int i = 0; i < 4/D; ++i) {
                    uint32_t c = (w >> (i*bits)) & cmask;
                    c = c < (uint32_t) L.grid_size ? c : 0;
                    grid_point<D>(s_grid, c, sc, &v[s][i*D]);
                }
            }
            // h = 1, 2: inside a lane's four channels (G >= 4)
#pragma unroll
            for (int s = 0; s < S; ++s) {
                butterfly(v[s][0], v[s][1]);
                butterfly(v[s][2], v[s][3]);
            }
#pragma unroll
            for (int s = 0; s < S; ++s) {
                butterfly(v[s][0], v[s][2]);
                butterfly(v[s][1], v[s][3]);
            }
            // h = 4 .. 64: lane l pairs with lane l ^ (h/4); the lower lane holds a, the upper one b
#pragma unroll
            for (int m = 1; m < 32; m *= 2) {
                if (4*m >= G) {
                    break;
                }
                // lower: own + partner = a + b; upper: partner - own = a - b, as fma(own, -1, partner):
                // the product is exact, so this is the one rounding of the add or the subtraction
                const float sign = (lane & m) ? -1.0f : 1.0f;
#pragma unroll
                for (int s = 0; s < S; ++s) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const float o = __shfl_xor_sync(0xffffffffu, v[s][j], m);
                        v[s][j] = __fmaf_rn(v[s][j], sign, o);
                    }
                }
            }
            // h = 128 .. G/2: strip s pairs with strip s + h/128 of the same lane
#pragma unroll
            for (int m = 1; m < S; m *= 2) {
                if (128*m >= G) {
                    break;
                }
#pragma unroll
                for (int s = 0; s < S; ++s) {
                    if ((s & m) == 0) {
#pragma unroll
                        for (int j = 0; j < 4; ++j) {
                            butterfly(v[s][j], v[s + m][j]);
                        }
                    }
                }
            }
#pragma unroll
            for (int s = 0; s < S; ++s) {
                const int    c  = 128*(k0 + s) + 4*lane;
                const float4 bv = has_b ? __ldg((const float4 *) (bias + c)) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                float4 o;
                o.x = decode_finish(v[s][0], inv_g, has_p, pv[s].x, has_b, bv.x);
                o.y = decode_finish(v[s][1], inv_g, has_p, pv[s].y, has_b, bv.y);
                o.z = decode_finish(v[s][2], inv_g, has_p, pv[s].z, has_b, bv.z);
                o.w = decode_finish(v[s][3], inv_g, has_p, pv[s].w, has_b, bv.w);
                *(float4 *) (dst + c) = o;
            }
        }
    }
}

// --- RoPE and the f16 cast of reconstructed keys (aquakv-ops.h: ggml_aquakv_rope_f16) ---------

// out_i = x_i·r_i - x_j·r_j, out_j = x_i·r_j + x_j·r_i, each product and sum rounded on its own
// (no contraction): the formula as written, the same result on every arch
__device__ __forceinline__ void rope_pair(float xi, float xj, float ri, float rj, float & oi, float & oj) {
    oi = __fsub_rn(__fmul_rn(xi, ri), __fmul_rn(xj, rj));
    oj = __fadd_rn(__fmul_rn(xi, rj), __fmul_rn(xj, ri));
}

// Memory-bound: each thread rotates two pairs, four channels, with float2/float4 loads and half2
// stores. Quad q of row (h, t) covers channels 4q..4q+3 (pairs (2k, 2k+1), NEOX = false) or
// 2q, 2q+1 and the same + hd/2 (pairs (k, k + hd/2), NEOX = true). Needs hd % 4 == 0 and aligned
// rows (the launcher checks); rot row t is read by all n_head rows of t, from the cache.
template <bool NEOX>
__global__ void aquakv_rope_f16_kernel(const float * __restrict__ x, const float * __restrict__ rot,
                                       half * __restrict__ dst, int hd, int n_head, int64_t n_quads) {
    const int64_t q = (int64_t) blockIdx.x*blockDim.x + threadIdx.x;
    if (q >= n_quads) {
        return;
    }
    const int     qpr = hd/4;
    const int64_t row = q / qpr;  // h + n_head·t
    const int     iq  = (int) (q % qpr);
    const float * xr  = x + row*hd;
    const float * rr  = rot + (row / n_head)*hd;
    half *        dr  = dst + row*hd;
    if (NEOX) {
        const int k = 2*iq;
        const int h = hd/2;
        const float2 x0 = *(const float2 *) (xr + k);
        const float2 x1 = *(const float2 *) (xr + k + h);
        const float2 c  = __ldg((const float2 *) (rr + k));
        const float2 sn = __ldg((const float2 *) (rr + k + h));
        float2 lo, hi;
        rope_pair(x0.x, x1.x, c.x, sn.x, lo.x, hi.x);
        rope_pair(x0.y, x1.y, c.y, sn.y, lo.y, hi.y);
        *(half2 *) (dr + k)     = __floats2half2_rn(lo.x, lo.y);
        *(half2 *) (dr + k + h) = __floats2half2_rn(hi.x, hi.y);
    } else {
        const float4 xv = *(const float4 *) (xr + 4*iq);
        const float4 rv = __ldg((const float4 *) (rr + 4*iq));
        float4 o;
        rope_pair(xv.x, xv.y, rv.x, rv.y, o.x, o.y);
        rope_pair(xv.z, xv.w, rv.z, rv.w, o.z, o.w);
        half2 h2[2] = { __floats2half2_rn(o.x, o.y), __floats2half2_rn(o.z, o.w) };
        *(uint2 *) (dr + 4*iq) = *(const uint2 *) h2;
    }
}

// any even hd, any alignment: one pair per thread, scalar loads and stores
template <bool NEOX>
__global__ void aquakv_rope_f16_scalar_kernel(const float * __restrict__ x, const float * __restrict__ rot,
                                              half * __restrict__ dst, int hd, int n_head, int64_t n_pairs) {
    const int64_t q = (int64_t) blockIdx.x*blockDim.x + threadIdx.x;
    if (q >= n_pairs) {
        return;
    }
    const int     ppr = hd/2;
    const int64_t row = q / ppr;
    const int     k   = (int) (q % ppr);
    const int     i   = NEOX ? k : 2*k;
    const int     j   = NEOX ? k + ppr : 2*k + 1;
    const float * xr  = x + row*hd;
    const float * rr  = rot + (row / n_head)*hd;
    float oi, oj;
    rope_pair(xr[i], xr[j], rr[i], rr[j], oi, oj);
    dst[row*hd + i] = __float2half_rn(oi);
    dst[row*hd + j] = __float2half_rn(oj);
}

// window rows over their reconstructed cells: dst row win_dst[j] = win[win_src[j]] (F16 -> F32)
__global__ void aquakv_window_read_kernel(const char * win, size_t win_nb1, int64_t n_slots, const int32_t * win_src,
                                          const int32_t * win_dst, char * out, size_t onb1, int64_t n_rows, int C) {
    const int j = blockIdx.x;
    const int32_t slot = win_src[j];
    const int32_t row  = win_dst[j];
    if (slot < 0 || slot >= n_slots || row < 0 || row >= n_rows) {
        return;
    }
    const half * src = (const half *) (win + slot*win_nb1);
    float * dst = (float *) (out + row*onb1);
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        dst[i] = __half2float(src[i]);
    }
}

// one float4 -> two half2 per thread (VEC), else one value
template <bool VEC>
__global__ void aquakv_cast_f16_kernel(const float * __restrict__ x, half * __restrict__ out, int64_t n_items) {
    const int64_t i = (int64_t) blockIdx.x*blockDim.x + threadIdx.x;
    if (i >= n_items) {
        return;
    }
    if (VEC) {
        const float4 v = ((const float4 *) x)[i];
        half2 * o = (half2 *) out + 2*i;
        o[0] = __floats2half2_rn(v.x, v.y);
        o[1] = __floats2half2_rn(v.z, v.w);
    } else {
        out[i] = __float2half(x[i]);
    }
}

} // namespace

cudaError_t aquakv_cuda_encode(cudaStream_t stream, const char * resid, size_t resid_nb1, int64_t n_rows,
                               const int32_t * idx, char * codes, size_t codes_nb1, int64_t n_rows_codes,
                               const float * grid, aquakv_cuda_layout L) {
    const size_t smem = sizeof(float)*(L.n_channels + AQUAKV_MAX_GRID_FLOATS + 256) + sizeof(double)*AQUAKV_MAX_GROUPS +
                        sizeof(uint32_t)*(L.n_channels/L.grid_dim);
    aquakv_encode_kernel<<<(unsigned) n_rows, AQUAKV_BLOCK, smem, stream>>>(resid, resid_nb1, idx, codes, codes_nb1,
                                                                          n_rows_codes, grid, L);
    return cudaGetLastError();
}

cudaError_t aquakv_cuda_window(cudaStream_t stream, const char * rows, size_t rows_nb1, int64_t n_rows,
                               const int32_t * idx, char * win, size_t win_nb1, int64_t n_slots, int n_channels) {
    aquakv_window_kernel<<<(unsigned) n_rows, AQUAKV_BLOCK, 0, stream>>>(rows, rows_nb1, idx, win, win_nb1, n_slots,
                                                                       n_channels);
    return cudaGetLastError();
}

cudaError_t aquakv_cuda_decode_reference(cudaStream_t stream, const char * codes, size_t nb1, size_t nb2, size_t nb3,
                                         int64_t ne1, int64_t ne2, int64_t ne3, char * out, size_t onb1, size_t onb2,
                                         size_t onb3, const float * grid, const char * pred, size_t pred_nb1,
                                         const float * bias, aquakv_cuda_layout L) {
    if (ne1*ne2*ne3 == 0) {
        return cudaSuccess;
    }
    const size_t smem = sizeof(float)*(L.n_channels + AQUAKV_MAX_GRID_FLOATS);
    aquakv_decode_kernel<<<(unsigned) (ne1*ne2*ne3), AQUAKV_BLOCK, smem, stream>>>(codes, nb1, nb2, nb3, ne1, ne2, out,
                                                                                onb1, onb2, onb3, grid, pred, pred_nb1,
                                                                                bias, L);
    return cudaGetLastError();
}

namespace {

bool aligned(const void * p, size_t a) {
    return (uintptr_t) p % a == 0;
}

template <int D>
cudaError_t launch_warp_decode(int s, dim3 blocks, cudaStream_t stream, const char * codes, size_t nb1, size_t nb2,
                               size_t nb3, int64_t ne1, int64_t ne2, int64_t n_rows, char * out, size_t onb1,
                               size_t onb2, size_t onb3, const float * grid, const char * pred, size_t pred_nb1,
                               const float * bias, const aquakv_cuda_layout & L) {
    const dim3 threads(AQUAKV_DEC_WARPS*32);
#define AQUAKV_WARP_DECODE(S) \
    aquakv_decode_warp_kernel<D, S><<<blocks, threads, 0, stream>>>(codes, nb1, nb2, nb3, ne1, ne2, n_rows, out, onb1, \
                                                                   onb2, onb3, grid, pred, pred_nb1, bias, L)
    switch (s) {
        case 1:  AQUAKV_WARP_DECODE(1);  break;
        case 2:  AQUAKV_WARP_DECODE(2);  break;
        case 4:  AQUAKV_WARP_DECODE(4);  break;
        case 8:  AQUAKV_WARP_DECODE(8);  break;
        case 16: AQUAKV_WARP_DECODE(16); break;
        default: return cudaErrorInvalidValue;
    }
#undef AQUAKV_WARP_DECODE
    return cudaGetLastError();
}

} // namespace

// strips per set of the warp kernel for these arguments, 0 where it does not apply: C a multiple of 128
// (32 lane chunks of four channels per strip), groups of 4 channels (one scale per lane chunk) to
// 16 strips (registers), a lane's four channels a whole number of codes of at most 32 bits, f32 rows
// 16-byte aligned for the float4 accesses
int aquakv_cuda_decode_warp_strips(const aquakv_cuda_layout & L, const char * out, size_t onb1, size_t onb2,
                                   size_t onb3, const char * pred, size_t pred_nb1, const float * bias) {
    const int d = L.grid_dim;
    if (L.n_channels % 128 != 0 || L.group_size > 16*128 || L.group_size < 4 || (d != 1 && d != 2 && d != 4) ||
        4*L.bits/d > 32 || L.grid_size*d > AQUAKV_MAX_GRID_FLOATS) {
        return 0;
    }
    if (!aligned(out, 16) || onb1 % 16 || onb2 % 16 || onb3 % 16 || (pred && (!aligned(pred, 16) || pred_nb1 % 16)) ||
        (bias && !aligned(bias, 16))) {
        return 0;
    }
    const int n_strips = L.n_channels/128;
    int s = L.group_size > 128 ? L.group_size/128 : 1;
    while (s < 4 && n_strips % (2*s) == 0) {
        s *= 2;  // a few strips at once even for small groups: more loads in flight per warp
    }
    return s;
}

cudaError_t aquakv_cuda_decode(cudaStream_t stream, const char * codes, size_t nb1, size_t nb2, size_t nb3,
                               int64_t ne1, int64_t ne2, int64_t ne3, char * out, size_t onb1, size_t onb2,
                               size_t onb3, const float * grid, const char * pred, size_t pred_nb1,
                               const float * bias, aquakv_cuda_layout L) {
    const int64_t n_rows = ne1*ne2*ne3;
    if (n_rows == 0) {
        return cudaSuccess;
    }
    const int s = aquakv_cuda_decode_warp_strips(L, out, onb1, onb2, onb3, pred, pred_nb1, bias);
    if (s == 0) {
        return aquakv_cuda_decode_reference(stream, codes, nb1, nb2, nb3, ne1, ne2, ne3, out, onb1, onb2, onb3, grid,
                                            pred, pred_nb1, bias, L);
    }
    const dim3 blocks((unsigned) ((n_rows + AQUAKV_DEC_ROWS - 1)/AQUAKV_DEC_ROWS));
    switch (L.grid_dim) {
        case 1: return launch_warp_decode<1>(s, blocks, stream, codes, nb1, nb2, nb3, ne1, ne2, n_rows, out, onb1, onb2,
                                             onb3, grid, pred, pred_nb1, bias, L);
        case 2: return launch_warp_decode<2>(s, blocks, stream, codes, nb1, nb2, nb3, ne1, ne2, n_rows, out, onb1, onb2,
                                             onb3, grid, pred, pred_nb1, bias, L);
        default: return launch_warp_decode<4>(s, blocks, stream, codes, nb1, nb2, nb3, ne1, ne2, n_rows, out, onb1,
                                              onb2, onb3, grid, pred, pred_nb1, bias, L);
    }
}

cudaError_t aquakv_cuda_window_read(cudaStream_t stream, const char * win, size_t win_nb1, int64_t n_slots,
                                    const int32_t * win_src, const int32_t * win_dst, int64_t n_w, char * out,
                                    size_t onb1, int64_t n_rows, int n_channels) {
    aquakv_window_read_kernel<<<(unsigned) n_w, AQUAKV_BLOCK, 0, stream>>>(win, win_nb1, n_slots, win_src, win_dst, out,
                                                                          onb1, n_rows, n_channels);
    return cudaGetLastError();
}

cudaError_t aquakv_cuda_cast_f16(cudaStream_t stream, const float * x, void * dst, int64_t n) {
    if (n == 0) {
        return cudaSuccess;
    }
    constexpr int threads = 256;
    half * out = (half *) dst;
    const bool vec = n % 4 == 0 && aligned(x, 16) && aligned(dst, 8);
    const int64_t n_items = vec ? n/4 : n;
    const dim3 blocks((unsigned) ((n_items + threads - 1)/threads));
    if (vec) {
        aquakv_cast_f16_kernel<true><<<blocks, threads, 0, stream>>>(x, out, n_items);
    } else {
        aquakv_cast_f16_kernel<false><<<blocks, threads, 0, stream>>>(x, out, n_items);
    }
    return cudaGetLastError();
}

cudaError_t aquakv_cuda_rope_f16(cudaStream_t stream, const float * x, const float * rot, void * dst, int64_t head_dim,
                                 int64_t n_head, int64_t n_tokens, int neox) {
    const int64_t n_rows = n_head*n_tokens;
    if (n_rows == 0 || head_dim == 0) {
        return cudaSuccess;
    }
    if (head_dim % 2 != 0 || head_dim > INT32_MAX || n_head > INT32_MAX) {
        return cudaErrorInvalidValue;
    }
    const int hd = (int) head_dim, nh = (int) n_head;
    half * out = (half *) dst;
    constexpr int threads = 256;
    // float4 / float2 loads and 8- / 4-byte stores need hd % 4 == 0 and aligned bases (rows are
    // then aligned too)
    const bool vec = hd % 4 == 0 && aligned(x, neox ? 8 : 16) && aligned(rot, neox ? 8 : 16) && aligned(dst, neox ? 4 : 8);
    const int64_t n_items = vec ? n_rows*(hd/4) : n_rows*(hd/2);
    const dim3 blocks((unsigned) ((n_items + threads - 1)/threads));
    if (vec) {
        if (neox) {
            aquakv_rope_f16_kernel<true><<<blocks, threads, 0, stream>>>(x, rot, out, hd, nh, n_items);
        } else {
            aquakv_rope_f16_kernel<false><<<blocks, threads, 0, stream>>>(x, rot, out, hd, nh, n_items);
        }
    } else {
        if (neox) {
            aquakv_rope_f16_scalar_kernel<true><<<blocks, threads, 0, stream>>>(x, rot, out, hd, nh, n_items);
        } else {
            aquakv_rope_f16_scalar_kernel<false><<<blocks, threads, 0, stream>>>(x, rot, out, hd, nh, n_items);
        }
    }
    return cudaGetLastError();
}
