// CUDA kernels of the AQUA-KV ggml ops: the same semantics as the CPU kernels
// (native/ops-cpu/aquakv-ops-cpu.cpp, DESIGN.md §3). One thread block per row: the row lives in
// shared memory for the group norms, the in-place Walsh-Hadamard butterflies and the grid search.
// Plain CUDA (shared memory, __syncthreads, shared-memory float atomics): nothing Hopper-only, so
// the code builds for sm_75 and later. Self-contained (no ggml-cuda headers), so that nvcc alone
// compiles it (CI checks that).
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

cudaError_t aquakv_cuda_decode(cudaStream_t stream, const char * codes, size_t nb1, size_t nb2, size_t nb3,
                               int64_t ne1, int64_t ne2, int64_t ne3, char * out, size_t onb1, size_t onb2,
                               size_t onb3, const float * grid, const char * pred, size_t pred_nb1,
                               const float * bias, aquakv_cuda_layout L) {
    const size_t smem = sizeof(float)*(L.n_channels + AQUAKV_MAX_GRID_FLOATS);
    aquakv_decode_kernel<<<(unsigned) (ne1*ne2*ne3), AQUAKV_BLOCK, smem, stream>>>(codes, nb1, nb2, nb3, ne1, ne2, out,
                                                                                onb1, onb2, onb3, grid, pred, pred_nb1,
                                                                                bias, L);
    return cudaGetLastError();
}

cudaError_t aquakv_cuda_window_read(cudaStream_t stream, const char * win, size_t win_nb1, int64_t n_slots,
                                    const int32_t * win_src, const int32_t * win_dst, int64_t n_w, char * out,
                                    size_t onb1, int64_t n_rows, int n_channels) {
    aquakv_window_read_kernel<<<(unsigned) n_w, AQUAKV_BLOCK, 0, stream>>>(win, win_nb1, n_slots, win_src, win_dst, out,
                                                                          onb1, n_rows, n_channels);
    return cudaGetLastError();
}
