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

cudaError_t aquakv_cuda_decode(cudaStream_t stream, const char * codes, size_t nb1, size_t nb2, size_t nb3,
                               int64_t ne1, int64_t ne2, int64_t ne3, char * out, size_t onb1, size_t onb2,
                               size_t onb3, const float * grid, const char * pred, size_t pred_nb1,
                               const float * bias, aquakv_cuda_layout L);

// out rows (contiguous, stride onb1) win_dst[j] = f32(win rows win_src[j])
cudaError_t aquakv_cuda_window_read(cudaStream_t stream, const char * win, size_t win_nb1, int64_t n_slots,
                                    const int32_t * win_src, const int32_t * win_dst, int64_t n_w, char * out,
                                    size_t onb1, int64_t n_rows, int n_channels);
