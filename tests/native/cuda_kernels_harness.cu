// Standalone check of the AQUA-KV CUDA kernels on a GPU: the warp-per-row decode kernel against the
// reference (block-per-row) kernel, bit for bit, on random packed rows, grids, predictions and
// biases over many layouts and strides; the RoPE + f16 kernel against a host loop of its formula;
// and the timings of both at the read path's shapes. Exits non-zero on any mismatch. Build and run
// from the repository root on a machine with a GPU:
//
//   nvcc -std=c++17 -O2 -arch=sm_90 -Xcompiler -ffp-contract=off -Inative/ops-cuda tests/native/cuda_kernels_harness.cu native/ops-cuda/aquakv-kernels.cu -o /tmp/cuda_kernels_harness && /tmp/cuda_kernels_harness
//
// (-ffp-contract=off: the host's RoPE loop must round each product and sum on its own, as the
// kernel does.) Optional argument: the number of timed launches per case (default 20).

#include "aquakv-kernels.cuh"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

#define CHECK(call)                                                                                  \
    do {                                                                                             \
        const cudaError_t err_ = (call);                                                             \
        if (err_ != cudaSuccess) {                                                                   \
            std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
            std::exit(2);                                                                            \
        }                                                                                            \
    } while (0)

struct rng {
    uint64_t s;
    explicit rng(uint64_t seed) : s(seed*0x9E3779B97F4A7C15ull + 1) {}
    uint64_t next() {  // splitmix64
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30))*0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27))*0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    float uniform() { return (float) ((next() >> 40)*(1.0/16777216.0)); }  // [0, 1)
    float normal() {
        const float u = std::fmax(uniform(), 1e-7f), v = uniform();
        return std::sqrt(-2.0f*std::log(u))*std::cos(6.2831853f*v);
    }
};

template <typename T> struct dev_buf {
    T * p = nullptr;
    explicit dev_buf(size_t n) { CHECK(cudaMalloc(&p, n*sizeof(T) + 16)); }
    ~dev_buf() { cudaFree(p); }
    dev_buf(const dev_buf &) = delete;
    dev_buf & operator=(const dev_buf &) = delete;
};

int log2i(int n) {
    int b = 0;
    while ((1 << b) < n) {
        ++b;
    }
    return b;
}

// one decode configuration: rows at codes + i1*nb1 + i2*nb2 (ne3 = 1), out rows at
// i1*onb1 + i2*onb2, pred rows at r*pred_nb1
struct decode_case {
    const char * name;
    int  C, G, n_points, d;
    int64_t ne1, ne2;
    int  code_pad;   // bytes between code rows beyond row_bytes (any value: unaligned strides)
    int  out_pad;    // floats between output rows beyond C (multiple of 4: the warp kernel needs 16-byte rows)
    int  pred_pad;   // floats between prediction rows beyond C
    bool pred, bias;
    bool timed;
};

aquakv_cuda_layout make_layout(int C, int G, int n_points, int d) {
    const int bits = log2i(n_points);
    const int code_bytes = ((C/d)*bits + 7)/8;
    return { C, G, d, n_points, bits, code_bytes, code_bytes + 2*(C/G) };
}

int n_failed = 0;

void run_decode(const decode_case & tc, int reps, uint64_t seed) {
    const aquakv_cuda_layout L = make_layout(tc.C, tc.G, tc.n_points, tc.d);
    const int64_t n_rows = tc.ne1*tc.ne2;
    const size_t nb1 = L.row_bytes + tc.code_pad, nb2 = nb1*tc.ne1 + 3;  // odd plane stride too
    const size_t code_total = nb2*tc.ne2 + 8;
    const size_t onb1 = sizeof(float)*(tc.C + tc.out_pad), onb2 = onb1*tc.ne1;
    const size_t out_total = onb2*tc.ne2;
    const size_t pred_nb1 = sizeof(float)*(tc.C + tc.pred_pad);
    rng g(seed);

    // random bytes everywhere (every bit pattern is a valid code), then valid f16 norms in the scales
    std::vector<uint8_t> codes(code_total);
    for (auto & b : codes) {
        b = (uint8_t) g.next();
    }
    for (int64_t i2 = 0; i2 < tc.ne2; ++i2) {
        for (int64_t i1 = 0; i1 < tc.ne1; ++i1) {
            uint8_t * row = codes.data() + i1*nb1 + i2*nb2;
            for (int k = 0; k < tc.C/tc.G; ++k) {
                // norms over 6 decades like sample() in tests/native/test_aquakv_cuda.py; some zero
                const float s = g.uniform() < 0.01f ? 0.0f : std::exp(6.0f*g.uniform() - 3.0f)*std::sqrt((float) tc.G);
                const __half h = __float2half(s);
                std::memcpy(row + L.code_bytes + 2*k, &h, 2);
            }
        }
    }
    std::vector<float> grid(tc.n_points*tc.d), pred(tc.pred ? (size_t) n_rows*(pred_nb1/sizeof(float)) : 0), bias(tc.bias ? tc.C : 0);
    for (auto & v : grid) v = g.normal();
    for (auto & v : pred) v = g.normal()*std::exp(4.0f*g.uniform() - 2.0f);
    for (auto & v : bias) v = 0.1f*g.normal();

    dev_buf<uint8_t> d_codes(code_total);
    dev_buf<float>   d_grid(grid.size()), d_pred(pred.size() + 1), d_bias(bias.size() + 1);
    dev_buf<uint8_t> d_ref(out_total), d_new(out_total);
    CHECK(cudaMemcpy(d_codes.p, codes.data(), code_total, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d_grid.p, grid.data(), sizeof(float)*grid.size(), cudaMemcpyHostToDevice));
    if (tc.pred) CHECK(cudaMemcpy(d_pred.p, pred.data(), sizeof(float)*pred.size(), cudaMemcpyHostToDevice));
    if (tc.bias) CHECK(cudaMemcpy(d_bias.p, bias.data(), sizeof(float)*bias.size(), cudaMemcpyHostToDevice));
    // the same filler in both outputs: the padding between rows must stay untouched
    CHECK(cudaMemset(d_ref.p, 0xA5, out_total));
    CHECK(cudaMemset(d_new.p, 0xA5, out_total));

    const char *  cp = (const char *) d_codes.p;
    const char *  pp = tc.pred ? (const char *) d_pred.p : nullptr;
    const float * bp = tc.bias ? d_bias.p : nullptr;
    auto ref = [&]() {
        CHECK(aquakv_cuda_decode_reference(0, cp, nb1, nb2, nb2*tc.ne2, tc.ne1, tc.ne2, 1, (char *) d_ref.p, onb1, onb2,
                                           onb2*tc.ne2, d_grid.p, pp, pred_nb1, bp, L));
    };
    auto fast = [&]() {
        CHECK(aquakv_cuda_decode(0, cp, nb1, nb2, nb2*tc.ne2, tc.ne1, tc.ne2, 1, (char *) d_new.p, onb1, onb2,
                                 onb2*tc.ne2, d_grid.p, pp, pred_nb1, bp, L));
    };
    ref();
    fast();
    CHECK(cudaDeviceSynchronize());
    std::vector<uint8_t> h_ref(out_total), h_new(out_total);
    CHECK(cudaMemcpy(h_ref.data(), d_ref.p, out_total, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(h_new.data(), d_new.p, out_total, cudaMemcpyDeviceToHost));
    double max_abs = 0.0;
    int64_t n_diff = 0;
    for (size_t i = 0; i + 4 <= out_total; i += 4) {
        if (std::memcmp(&h_ref[i], &h_new[i], 4) != 0) {
            float a, b;
            std::memcpy(&a, &h_ref[i], 4);
            std::memcpy(&b, &h_new[i], 4);
            const double e = std::fabs((double) a - (double) b);
            max_abs = std::isnan(e) ? INFINITY : std::fmax(max_abs, e);
            ++n_diff;
        }
    }
    const int strips = aquakv_cuda_decode_warp_strips(L, (const char *) d_new.p, onb1, onb2, onb2*tc.ne2, pp, pred_nb1, bp);
    const bool ok = n_diff == 0;
    n_failed += !ok;
    char path[32];
    std::snprintf(path, sizeof(path), strips ? "warp S=%d" : "reference", strips);
    std::printf("decode %-28s C=%4d G=%4d n=%3d d=%d rows=%6lld %-10s max|diff| %-9.3g words differing %lld %s\n",
                tc.name, tc.C, tc.G, tc.n_points, tc.d, (long long) n_rows, path, max_abs, (long long) n_diff,
                ok ? "OK" : "MISMATCH");

    if (tc.timed) {
        cudaEvent_t e0, e1;
        CHECK(cudaEventCreate(&e0));
        CHECK(cudaEventCreate(&e1));
        const double bytes = (double) n_rows*(L.row_bytes + sizeof(float)*tc.C*(1 + (tc.pred ? 1 : 0)));
        auto time_it = [&](const char * label, auto && launch) {
            launch();
            CHECK(cudaEventRecord(e0));
            for (int i = 0; i < reps; ++i) {
                launch();
            }
            CHECK(cudaEventRecord(e1));
            CHECK(cudaEventSynchronize(e1));
            float ms = 0.0f;
            CHECK(cudaEventElapsedTime(&ms, e0, e1));
            const double s = ms*1e-3/reps;
            std::printf("    %-9s %8.1f us  %8.1f M rows/s  %7.1f GB/s\n", label, s*1e6, n_rows/s*1e-6, bytes/s*1e-9);
        };
        time_it("reference", ref);
        time_it("new", fast);
        CHECK(cudaEventDestroy(e0));
        CHECK(cudaEventDestroy(e1));
    }
}

// ggml_aquakv_rope_f16's formula in float, each product and sum rounded on its own, then f16
void rope_host(const float * x, const float * rot, __half * out, int hd, int nh, int64_t nt, bool neox) {
    for (int64_t t = 0; t < nt; ++t) {
        const float * rt = rot + t*hd;
        for (int h = 0; h < nh; ++h) {
            const float * xr = x + (t*nh + h)*hd;
            __half * o = out + (t*nh + h)*hd;
            for (int k = 0; k < hd/2; ++k) {
                const int i = neox ? k : 2*k;
                const int j = neox ? k + hd/2 : 2*k + 1;
                const float a = xr[i]*rt[i];
                const float b = xr[j]*rt[j];
                const float c = xr[i]*rt[j];
                const float d = xr[j]*rt[i];
                o[i] = __float2half(a - b);
                o[j] = __float2half(c + d);
            }
        }
    }
}

void run_rope(const char * name, int hd, int nh, int64_t nt, bool neox, int offset, bool timed, int reps, uint64_t seed) {
    rng g(seed);
    const size_t n = (size_t) hd*nh*nt;
    std::vector<float> x(n), rot((size_t) hd*nt);
    for (auto & v : x) v = 4.0f*g.normal();
    for (int64_t t = 0; t < nt; ++t) {
        for (int k = 0; k < hd/2; ++k) {
            const int i = neox ? k : 2*k;
            const int j = neox ? k + hd/2 : 2*k + 1;
            const float th = 6.2831853f*g.uniform(), m = 0.5f + g.uniform();  // m: a YaRN-like magnitude
            rot[t*hd + i] = m*std::cos(th);
            rot[t*hd + j] = m*std::sin(th);
        }
    }
    std::vector<__half> want(n), got(n);
    rope_host(x.data(), rot.data(), want.data(), hd, nh, nt, neox);
    // offset > 0 shifts every buffer off its alignment: the scalar kernel's path
    dev_buf<float> d_x(n + 4), d_rot(rot.size() + 4);
    dev_buf<__half> d_out(n + 4);
    float * xp = d_x.p + offset;
    float * rp = d_rot.p + offset;
    __half * op = d_out.p + offset;
    CHECK(cudaMemcpy(xp, x.data(), sizeof(float)*n, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(rp, rot.data(), sizeof(float)*rot.size(), cudaMemcpyHostToDevice));
    CHECK(cudaMemset(op, 0xFF, sizeof(__half)*n));
    CHECK(aquakv_cuda_rope_f16(0, xp, rp, op, hd, nh, nt, neox ? 1 : 0));
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemcpy(got.data(), op, sizeof(__half)*n, cudaMemcpyDeviceToHost));
    int64_t n_diff = 0;
    double max_abs = 0.0;
    for (size_t i = 0; i < n; ++i) {
        if (std::memcmp(&want[i], &got[i], sizeof(__half)) != 0) {
            ++n_diff;
            const double e = std::fabs((double) __half2float(want[i]) - (double) __half2float(got[i]));
            max_abs = std::isnan(e) ? INFINITY : std::fmax(max_abs, e);
        }
    }
    const bool ok = n_diff == 0;
    n_failed += !ok;
    std::printf("rope   %-28s hd=%3d heads=%2d tokens=%6lld %s max|diff| %-9.3g values differing %lld %s\n", name, hd, nh,
                (long long) nt, neox ? "neox" : "norm", max_abs, (long long) n_diff, ok ? "OK" : "MISMATCH");
    if (timed) {
        cudaEvent_t e0, e1;
        CHECK(cudaEventCreate(&e0));
        CHECK(cudaEventCreate(&e1));
        CHECK(aquakv_cuda_rope_f16(0, xp, rp, op, hd, nh, nt, neox ? 1 : 0));
        CHECK(cudaEventRecord(e0));
        for (int i = 0; i < reps; ++i) {
            CHECK(aquakv_cuda_rope_f16(0, xp, rp, op, hd, nh, nt, neox ? 1 : 0));
        }
        CHECK(cudaEventRecord(e1));
        CHECK(cudaEventSynchronize(e1));
        float ms = 0.0f;
        CHECK(cudaEventElapsedTime(&ms, e0, e1));
        const double s = ms*1e-3/reps;
        const double bytes = (double) n*(sizeof(float) + sizeof(__half)) + (double) rot.size()*sizeof(float);
        std::printf("    %8.1f us  %7.1f GB/s\n", s*1e6, bytes/s*1e-9);
    }
}

// the value cast (ggml_aquakv_rope_f16 without a rotation) against __float2half on the host
void run_cast(const char * name, int64_t n, int offset, bool timed, int reps, uint64_t seed) {
    rng g(seed);
    std::vector<float> x((size_t) n);
    for (auto & v : x) v = 4.0f*g.normal();
    std::vector<__half> want((size_t) n), got((size_t) n);
    for (int64_t i = 0; i < n; ++i) {
        want[i] = __float2half(x[i]);
    }
    dev_buf<float> d_x((size_t) n + 4);
    dev_buf<__half> d_out((size_t) n + 4);
    float * xp = d_x.p + offset;
    __half * op = d_out.p + offset;
    CHECK(cudaMemcpy(xp, x.data(), sizeof(float)*n, cudaMemcpyHostToDevice));
    CHECK(cudaMemset(op, 0xFF, sizeof(__half)*n));
    CHECK(aquakv_cuda_cast_f16(0, xp, op, n));
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemcpy(got.data(), op, sizeof(__half)*n, cudaMemcpyDeviceToHost));
    int64_t n_diff = 0;
    for (int64_t i = 0; i < n; ++i) {
        n_diff += std::memcmp(&want[i], &got[i], sizeof(__half)) != 0;
    }
    const bool ok = n_diff == 0;
    n_failed += !ok;
    std::printf("cast   %-28s n=%10lld values differing %lld %s\n", name, (long long) n, (long long) n_diff, ok ? "OK" : "MISMATCH");
    if (timed) {
        cudaEvent_t e0, e1;
        CHECK(cudaEventCreate(&e0));
        CHECK(cudaEventCreate(&e1));
        CHECK(cudaEventRecord(e0));
        for (int i = 0; i < reps; ++i) {
            CHECK(aquakv_cuda_cast_f16(0, xp, op, n));
        }
        CHECK(cudaEventRecord(e1));
        CHECK(cudaEventSynchronize(e1));
        float ms = 0.0f;
        CHECK(cudaEventElapsedTime(&ms, e0, e1));
        const double s = ms*1e-3/reps;
        std::printf("    %8.1f us  %7.1f GB/s\n", s*1e6, (double) n*(sizeof(float) + sizeof(__half))/s*1e-9);
    }
}

} // namespace

int main(int argc, char ** argv) {
    const int reps = argc > 1 ? std::atoi(argv[1]) : 20;
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("device: %s (sm_%d%d, %d SMs)\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);

    // name, C, G, points, d, ne1, ne2, code_pad, out_pad, pred_pad, pred, bias, timed
    const decode_case cases[] = {
        // the timed shapes of the brief (32768 rows), then the real ones: 8B keys/values (C = G = 1024),
        // 1B (C = G = 512), the 4-bit layer-0 grid (256 points in 2 dims) and the 3-bit one (64)
        { "C1024 G64 2-bit",             1024,   64,  16, 2, 32768, 1, 0, 0, 0, false, false, true },
        { "C1024 G64 2-bit +pred+bias",  1024,   64,  16, 2, 32768, 1, 0, 0, 0, true,  true,  true },
        { "C512 G64 2-bit",               512,   64,  16, 2, 32768, 1, 0, 0, 0, false, false, true },
        { "C512 G64 2-bit +pred+bias",    512,   64,  16, 2, 32768, 1, 0, 0, 0, true,  true,  true },
        { "8B C1024 G1024 2-bit",        1024, 1024,  16, 2, 32768, 1, 0, 0, 0, false, false, true },
        { "8B C1024 G1024 +pred+bias",   1024, 1024,  16, 2, 32768, 1, 0, 0, 0, true,  true,  true },
        { "8B layer0 4-bit (256x2)",     1024, 1024, 256, 2, 32768, 1, 0, 0, 0, false, false, true },
        { "8B 3-bit (64x2) +pred+bias",  1024, 1024,  64, 2, 32768, 1, 0, 0, 0, true,  true,  true },
        { "1B C512 G512 +pred+bias",      512,  512,  16, 2, 32768, 1, 0, 0, 0, true,  true,  true },
        { "2-bit 256x4 grid +pred+bias", 1024, 1024, 256, 4, 32768, 1, 0, 0, 0, true,  true,  true },
        // every lane mapping and feature: grid dims 1/2/4, S = 1..16, pred / bias alone, strides
        { "d1 256 points",               1024,  128, 256, 1,  3001, 1, 0, 0, 0, true,  false, false },
        { "d1 16 points +bias",           512,   64,  16, 1,  3001, 1, 0, 0, 0, false, true,  false },
        { "d4 16 points",                1024,  256,  16, 4,  3001, 1, 0, 0, 0, true,  true,  false },
        { "d4 G4",                        256,    4, 256, 4,  3001, 1, 0, 0, 0, true,  true,  false },
        { "d2 G4",                        256,    4,  16, 2,  3001, 1, 0, 0, 0, false, true,  false },
        { "C384 G128 (S=1)",              384,  128,  16, 2,  3001, 1, 0, 0, 0, true,  true,  false },
        { "C128 G128 rows 2 mod 4",       128,  128,  16, 2,  3001, 1, 0, 0, 0, true,  false, false },
        { "C128 G128 3-bit odd rows",     128,  128,  64, 2,  3001, 1, 0, 0, 0, false, true,  false },
        { "C2048 G2048 (S=16)",          2048, 2048,  16, 2,  1001, 1, 0, 0, 0, true,  true,  false },
        { "C4096 G2048 (S=16)",          4096, 2048,  64, 2,  1001, 1, 0, 0, 0, false, false, false },
        { "C8192 G128",                  8192,  128, 256, 2,  1001, 1, 0, 0, 0, true,  true,  false },
        { "C4096 G4096 (reference)",     4096, 4096,  16, 2,   501, 1, 0, 0, 0, true,  true,  false },
        { "C192 G64 (reference)",         192,   64,  16, 2,  3001, 1, 0, 0, 0, true,  true,  false },
        { "strided codes/out/pred 3d",   1024, 1024,  16, 2,   777, 3, 5, 12, 8, true,  true,  false },
        { "strided G64 3d",               512,   64,  64, 2,   555, 4, 1, 4, 4, true,  false, false },
        { "misaligned out (reference)",   512,   64,  16, 2,   300, 2, 0, 1, 0, true,  true,  false },
        { "pred only",                   1024, 1024,  16, 2,  2000, 1, 0, 0, 0, true,  false, false },
        { "bias only",                   1024, 1024,  16, 2,  2000, 1, 0, 0, 0, false, true,  false },
    };
    uint64_t seed = 1;
    for (const decode_case & tc : cases) {
        run_decode(tc, reps, seed++);
    }
    // keys of the 8B shape (head_dim 128, 8 KV heads) and of the 1B one (64), both pairings; odd
    // head counts and the scalar path (unaligned buffers, head_dim % 4 != 0)
    run_rope("8B keys",          128, 8, 32768, true,  0, true,  reps, seed++);
    run_rope("8B keys",          128, 8, 32768, false, 0, true,  reps, seed++);
    run_rope("1B keys",           64, 8, 32768, true,  0, true,  reps, seed++);
    run_rope("1B keys",           64, 8,  4097, false, 0, false, reps, seed++);
    run_rope("3 heads",           64, 3,   333, true,  0, false, reps, seed++);
    run_rope("unaligned buffers", 64, 2,   333, true,  1, false, reps, seed++);
    run_rope("unaligned buffers", 64, 2,   333, false, 1, false, reps, seed++);
    run_rope("head_dim 6",         6, 2,   333, true,  0, false, reps, seed++);
    run_rope("head_dim 6",         6, 2,   333, false, 0, false, reps, seed++);

    run_cast("8B values, 32K cells", (int64_t) 1024*32768, 0, true,  reps, seed++);
    run_cast("odd length, unaligned",  1000003,            1, false, reps, seed++);

    std::printf("%s: %d case(s) failed\n", n_failed ? "FAILED" : "all passed", n_failed);
    return n_failed ? 1 : 0;
}

