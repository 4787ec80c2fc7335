// aquakv-gguf: C API entry points that run the AQUA-KV ops alone (op-level tests) and report
// the cache's sizes (native/include/aquakv-capi.h).

#include "aquakv-capi.h"
#include "aquakv-cache.h"
#include "aquakv-ops.h"

#include "llama-context.h"
#include "llama-impl.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <exception>
#include <numeric>
#include <vector>

namespace {

// the CPU backend with n_threads threads, or the first GPU (the thread setter is looked up through
// the registry, as the tools do, so libllama needs no link-time dependency on ggml-cpu)
ggml_backend_ptr op_backend(int32_t n_threads, bool gpu) {
    ggml_backend_ptr backend(ggml_backend_init_by_type(gpu ? GGML_BACKEND_DEVICE_TYPE_GPU : GGML_BACKEND_DEVICE_TYPE_CPU,
                                                       nullptr));
    if (backend && n_threads > 0) {
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(ggml_backend_get_device(backend.get()));
        auto * set_threads = (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
        if (set_threads) {
            set_threads(backend.get(), n_threads);
        }
    }
    return backend;
}

bool layout_ok(int32_t n_channels, int32_t group_size, int32_t grid_dim, int32_t grid_size, aquakv_row_layout & l) {
    if (!aquakv_make_layout(n_channels, group_size, grid_dim, grid_size, &l)) {
        LLAMA_LOG_ERROR("aquakv: invalid op parameters: C = %d, group %d, grid %d x %d\n",
                        n_channels, group_size, grid_size, grid_dim);
        return false;
    }
    return true;
}

// builds one op on a CPU backend, fills its inputs, computes it and reads the result back:
// build(ctx) -> the op's tensor; upload() sets the inputs; download() reads the outputs
template <typename Build, typename Upload, typename Download>
int32_t run_op(const char * what, int32_t n_threads, bool gpu, Build && build, Upload && upload, Download && download) {
    try {
        ggml_init_params params = { 64*ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
        ggml_context_ptr ctx(ggml_init(params));
        ggml_backend_ptr backend = op_backend(n_threads, gpu);
        if (!ctx || !backend) {
            LLAMA_LOG_ERROR("aquakv: cannot create a %s backend for the %s op\n", gpu ? "GPU" : "CPU", what);
            return -1;
        }
        ggml_cgraph * gf = ggml_new_graph(ctx.get());
        ggml_tensor * op = build(ctx.get());
        if (!ggml_backend_supports_op(backend.get(), op)) {
            LLAMA_LOG_ERROR("aquakv: the %s backend does not support this %s op\n", gpu ? "GPU" : "CPU", what);
            return -1;
        }
        ggml_build_forward_expand(gf, op);
        ggml_backend_buffer_ptr buf(ggml_backend_alloc_ctx_tensors(ctx.get(), backend.get()));
        upload();
        if (ggml_backend_graph_compute(backend.get(), gf) != GGML_STATUS_SUCCESS) {
            LLAMA_LOG_ERROR("aquakv: the %s op failed\n", what);
            return -1;
        }
        download();
        return 0;
    } catch (const std::exception & e) {
        LLAMA_LOG_ERROR("aquakv: %s failed: %s\n", what, e.what());
        return -1;
    }
}

} // namespace

extern "C" int64_t aquakv_op_row_bytes(int32_t n_channels, int32_t group_size, int32_t grid_dim, int32_t grid_size) {
    aquakv_row_layout l;
    return aquakv_make_layout(n_channels, group_size, grid_dim, grid_size, &l) ? (int64_t) l.row_bytes : -1;
}

extern "C" int32_t aquakv_op_encode(const float * x, int64_t n_rows, int32_t n_channels, const float * grid,
                                    int32_t grid_size, int32_t grid_dim, int32_t group_size, int32_t n_threads,
                                    bool gpu, uint8_t * out) {
    aquakv_row_layout l;
    if (n_rows <= 0 || !layout_ok(n_channels, group_size, grid_dim, grid_size, l)) {
        return -1;
    }
    ggml_tensor * codes = nullptr, * xt = nullptr, * idx = nullptr, * g = nullptr;
    std::vector<int32_t> rows(n_rows);
    std::iota(rows.begin(), rows.end(), 0);
    return run_op("encode", n_threads, gpu,
        [&](ggml_context * ctx) {
            codes = ggml_new_tensor_2d(ctx, GGML_TYPE_I8, (int64_t) l.row_bytes, n_rows);
            xt    = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_channels, n_rows);
            idx   = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_rows);
            g     = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, grid_dim, grid_size);
            return ggml_aquakv_store(ctx, codes, xt, idx, g, group_size, nullptr, nullptr, nullptr);
        },
        [&] {
            ggml_backend_tensor_set(xt, x, 0, ggml_nbytes(xt));
            ggml_backend_tensor_set(idx, rows.data(), 0, ggml_nbytes(idx));
            ggml_backend_tensor_set(g, grid, 0, ggml_nbytes(g));
        },
        [&] { ggml_backend_tensor_get(codes, out, 0, ggml_nbytes(codes)); });
}

extern "C" int32_t aquakv_op_decode(const uint8_t * rows, int64_t n_rows, int32_t n_channels, const float * grid,
                                    int32_t grid_size, int32_t grid_dim, int32_t group_size, int32_t n_threads,
                                    bool gpu, float * out) {
    aquakv_row_layout l;
    if (n_rows <= 0 || !layout_ok(n_channels, group_size, grid_dim, grid_size, l)) {
        return -1;
    }
    ggml_tensor * codes = nullptr, * g = nullptr, * res = nullptr;
    return run_op("decode", n_threads, gpu,
        [&](ggml_context * ctx) {
            codes = ggml_new_tensor_2d(ctx, GGML_TYPE_I8, (int64_t) l.row_bytes, n_rows);
            g     = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, grid_dim, grid_size);
            return res = ggml_aquakv_decode(ctx, codes, g, n_channels, group_size);
        },
        [&] {
            ggml_backend_tensor_set(codes, rows, 0, ggml_nbytes(codes));
            ggml_backend_tensor_set(g, grid, 0, ggml_nbytes(g));
        },
        [&] { ggml_backend_tensor_get(res, out, 0, ggml_nbytes(res)); });
}

extern "C" int32_t aquakv_op_rope_f16(const float * x, const int32_t * pos, int64_t n_tokens, int32_t head_dim,
                                      int32_t n_head, int32_t neox, float freq_base, int32_t n_threads, bool gpu,
                                      bool fused, uint16_t * out) {
    if (n_tokens <= 0 || head_dim <= 0 || head_dim % 2 != 0 || n_head <= 0) {
        LLAMA_LOG_ERROR("aquakv: invalid RoPE op shape: head_dim %d, %d heads, %lld tokens\n", head_dim, n_head,
                        (long long) n_tokens);
        return -1;
    }
    const int mode = neox ? GGML_ROPE_TYPE_NEOX : 0;
    ggml_tensor * xt = nullptr, * pt = nullptr, * unit = nullptr, * res = nullptr;
    return run_op("rope", n_threads, gpu,
        [&](ggml_context * ctx) {
            xt = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, head_dim, n_head, n_tokens);
            pt = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_tokens);
            if (!fused) {  // upstream: ggml's RoPE, then the f16 cast
                ggml_tensor * r = ggml_rope_ext(ctx, xt, pt, nullptr, head_dim, mode, 0, freq_base, 1.0f, 0.0f, 1.0f,
                                                0.0f, 0.0f);
                return res = ggml_cast(ctx, r, GGML_TYPE_F16);
            }
            // the graph's form (aquakv-graph.cpp): rotations from the RoPE of the unit pattern
            unit = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, head_dim);
            ggml_tensor * units = ggml_repeat_4d(ctx, unit, head_dim, 1, n_tokens, 1);
            ggml_tensor * rot = ggml_rope_ext(ctx, units, pt, nullptr, head_dim, mode, 0, freq_base, 1.0f, 0.0f, 1.0f,
                                              0.0f, 0.0f);
            return res = ggml_aquakv_rope_f16(ctx, xt, ggml_reshape_2d(ctx, rot, head_dim, n_tokens), neox);
        },
        [&] {
            ggml_backend_tensor_set(xt, x, 0, ggml_nbytes(xt));
            ggml_backend_tensor_set(pt, pos, 0, ggml_nbytes(pt));
            if (unit) {
                std::vector<float> u(head_dim);
                for (int32_t i = 0; i < head_dim; ++i) {
                    u[i] = aquakv_rope_unit_pattern(i, head_dim, neox);
                }
                ggml_backend_tensor_set(unit, u.data(), 0, ggml_nbytes(unit));
            }
        },
        [&] { ggml_backend_tensor_get(res, out, 0, ggml_nbytes(res)); });
}

extern "C" int32_t aquakv_op_cast_f16(const float * x, int64_t n_rows, int32_t n_channels, int32_t n_threads, bool gpu,
                                      uint16_t * out) {
    if (n_rows <= 0 || n_channels <= 0) {
        LLAMA_LOG_ERROR("aquakv: invalid cast op shape\n");
        return -1;
    }
    ggml_tensor * xt = nullptr, * res = nullptr;
    return run_op("cast", n_threads, gpu,
        [&](ggml_context * ctx) {
            xt = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_channels, 1, n_rows);
            return res = ggml_aquakv_rope_f16(ctx, xt, nullptr, 0);
        },
        [&] { ggml_backend_tensor_set(xt, x, 0, ggml_nbytes(xt)); },
        [&] { ggml_backend_tensor_get(res, out, 0, ggml_nbytes(res)); });
}

extern "C" int32_t aquakv_context_cache_info(const llama_context * ctx, int64_t * out) {
    const auto * aq = dynamic_cast<const llama_kv_cache_aqua *>(llama_get_memory(ctx));
    if (aq == nullptr) {
        return 0;
    }
    if (out) {
        out[0] = (int64_t) aq->bytes_codes();
        out[1] = (int64_t) aq->bytes_window();
        out[2] = aq->get_size();
        out[3] = aq->get_n_stream();
        out[4] = aq->get_n_win();
    }
    return 1;
}
