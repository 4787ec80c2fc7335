// aquakv-gguf: CUDA kernels of the AQUA-KV ggml ops (dispatched by the hook in ggml-cuda.cu).
#pragma once

#include "common.cuh"

void ggml_cuda_op_aquakv_store (ggml_backend_cuda_context & ctx, ggml_tensor * dst);
void ggml_cuda_op_aquakv_decode(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
bool ggml_cuda_aquakv_supports_op(const ggml_tensor * op);
