// aquakv-gguf: launchers of the AQUA-KV CUDA kernels (raw pointers and byte strides, so that this
// part builds with nvcc alone; the ggml dispatch is native/ops-cuda/aquakv-ops.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

// shared-memory budgets of the kernels (checked by the op's supports_op)
constexpr int AQUAKV_MAX_GRID_FLOATS = 256*4;  // grid points * dim
constexpr int AQUAKV_MAX_GROUPS      = 64;     // C / G

struct aquakv_cuda_layout {
    int n_channels;
    int group_size;
    int grid_dim;
    int grid_size;
    int bits;
    int code_bytes;
    int row_bytes;
};

cudaError_t aquakv_cuda_encode(cudaStream_t stream, const char * resid, size_t resid_nb1, int64_t n_rows,
                               const int32_t * idx, char * codes, size_t codes_nb1, int64_t n_rows_codes,
                               const float * grid, aquakv_cuda_layout L);

cudaError_t aquakv_cuda_window(cudaStream_t stream, const char * rows, size_t rows_nb1, int64_t n_rows,
                               const int32_t * idx, char * win, size_t win_nb1, int64_t n_slots, int n_channels);

// Decode packed rows (codes rows at i1*nb1 + i2*nb2 + i3*nb3) into f32 rows of out (same indexing
// with onb*), plus pred row r = i1 + ne1*(i2 + ne2*i3) (pred + r*pred_nb1) and bias where not null.
// One warp per row (aquakv_decode_warp_kernel) where the layout allows it, else the reference
// kernel; both give the same bits.
cudaError_t aquakv_cuda_decode(cudaStream_t stream, const char * codes, size_t nb1, size_t nb2, size_t nb3,
                               int64_t ne1, int64_t ne2, int64_t ne3, char * out, size_t onb1, size_t onb2,
                               size_t onb3, const float * grid, const char * pred, size_t pred_nb1,
                               const float * bias, aquakv_cuda_layout L);

// strips per warp of the warp kernel aquakv_cuda_decode would launch for these arguments (1..16), or
// 0 when it falls back to the reference kernel
int aquakv_cuda_decode_warp_strips(const aquakv_cuda_layout & L, const char * out, size_t onb1, size_t onb2,
                                   size_t onb3, const char * pred, size_t pred_nb1, const float * bias);

// The same with the first decode kernel (one 256-thread block per row, shared-memory butterflies):
// any valid layout within the budgets above; the reference of native/ops-cuda/test_aquakv_kernels.cu.
cudaError_t aquakv_cuda_decode_reference(cudaStream_t stream, const char * codes, size_t nb1, size_t nb2, size_t nb3,
                                         int64_t ne1, int64_t ne2, int64_t ne3, char * out, size_t onb1, size_t onb2,
                                         size_t onb3, const float * grid, const char * pred, size_t pred_nb1,
                                         const float * bias, aquakv_cuda_layout L);

// out rows (contiguous, stride onb1) win_dst[j] = f32(win rows win_src[j])
cudaError_t aquakv_cuda_window_read(cudaStream_t stream, const char * win, size_t win_nb1, int64_t n_slots,
                                    const int32_t * win_src, const int32_t * win_dst, int64_t n_w, char * out,
                                    size_t onb1, int64_t n_rows, int n_channels);

// RoPE + f16 cast (aquakv-ops.h: ggml_aquakv_rope_f16): x F32 [head_dim, n_head, n_tokens] and rot F32
// [head_dim, n_tokens], both contiguous -> dst F16 [head_dim, n_head, n_tokens] contiguous; pairs
// (2k, 2k+1) (neox = 0) or (k, k + head_dim/2) (neox = 1). head_dim must be even.
// dst[0..n) = half(x[0..n)): float4 loads and 8-byte stores where aligned (the value casts)
cudaError_t aquakv_cuda_cast_f16(cudaStream_t stream, const float * x, void * dst, int64_t n);

cudaError_t aquakv_cuda_rope_f16(cudaStream_t stream, const float * x, const float * rot, void * dst, int64_t head_dim,
                                 int64_t n_head, int64_t n_tokens, int neox);
