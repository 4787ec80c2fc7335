// aquakv-gguf: a flat C API over llama.h for the Python (cffi, ABI mode) bindings.
//
// Only scalars, strings and plain arrays cross this boundary: the bindings never mirror
// llama.cpp's parameter structs, whose layout changes between upstream versions.
// No C++ exception escapes; failures return NULL / a negative code and log the reason,
// which the caller reads back with aquakv_log_tail().
#pragma once

#include "llama.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Logging: installs a logger that keeps the last lines of llama.cpp/ggml output and
// echoes lines of level >= echo_level (enum ggml_log_level) to stderr; echo_level < 0
// echoes nothing.
LLAMA_API void   aquakv_log_capture(int32_t echo_level);
// Copies the retained lines (oldest first, '\n'-terminated) into buf (NUL-terminated,
// truncated to buf_size-1); returns the bytes the full text needs, excluding the NUL.
LLAMA_API size_t aquakv_log_tail(char * buf, size_t buf_size);
LLAMA_API void   aquakv_log_clear(void);

// ggml type id for a name such as "f16", "q8_0", "q4_0"; -1 if unknown.
LLAMA_API int32_t aquakv_type_from_name(const char * name);

// Loads a model. kv_overrides: NULL or '\n'-separated "key=type:value" entries with
// type int|float|bool|str (the --override-kv syntax of the llama.cpp tools).
LLAMA_API struct llama_model * aquakv_model_load(
        const char * path, int32_t n_gpu_layers, bool use_mmap, bool vocab_only,
        const char * kv_overrides);

// Creates a context. 0 keeps llama.cpp's default for the sizes and thread count;
// type_k/type_v: ggml type ids; flash_attn: -1 auto, 0 off, 1 on; op_offload: let the scheduler
// run large host-weight products on a GPU (llama.cpp's default; off keeps ngl 0 on the CPU).
LLAMA_API struct llama_context * aquakv_context_new(
        struct llama_model * model, uint32_t n_ctx, uint32_t n_batch, uint32_t n_ubatch,
        uint32_t n_seq_max, int32_t n_threads, int32_t type_k, int32_t type_v,
        int32_t flash_attn, bool kv_unified, bool offload_kqv, bool op_offload);

// Decodes n_tokens tokens, token i at position pos[i] of sequence seq_ids[i]; logits
// are kept for the tokens with want_logits[i] != 0. Returns llama_decode's status.
LLAMA_API int32_t aquakv_decode(
        struct llama_context * ctx, const llama_token * tokens, const llama_pos * pos,
        const llama_seq_id * seq_ids, const int8_t * want_logits, int32_t n_tokens);

// llama_tokenize / llama_token_to_piece / llama_detokenize with the same contract, except
// that an exception thrown inside llama.cpp (e.g. a vocabulary without byte tokens) is
// logged and reported as AQUAKV_ERR_EXCEPTION instead of terminating the process.
#define AQUAKV_ERR_EXCEPTION INT32_MIN
LLAMA_API int32_t aquakv_tokenize(
        const struct llama_vocab * vocab, const char * text, int32_t text_len, llama_token * tokens,
        int32_t n_tokens_max, bool add_special, bool parse_special);
LLAMA_API int32_t aquakv_token_to_piece(
        const struct llama_vocab * vocab, llama_token token, char * buf, int32_t length, bool special);
LLAMA_API int32_t aquakv_detokenize(
        const struct llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens, char * text,
        int32_t text_len_max, bool remove_special, bool unparse_special);

// The AQUA-KV ggml ops run alone on the CPU backend (gpu = false) or the first GPU, for tests
// against the torch quantizer and between backends.
// Row layout: native/include/aquakv-ops.h. grid: [grid_size, grid_dim] row-major f32.
// aquakv_op_row_bytes returns the packed row size, or -1 for an invalid combination.
// encode: x [n_rows, n_channels] f32 -> out [n_rows, row_bytes]; decode: rows -> out
// [n_rows, n_channels] f32. Both return 0, or -1 (logged) on invalid parameters.
LLAMA_API int64_t aquakv_op_row_bytes(int32_t n_channels, int32_t group_size, int32_t grid_dim, int32_t grid_size);
LLAMA_API int32_t aquakv_op_encode(
        const float * x, int64_t n_rows, int32_t n_channels, const float * grid, int32_t grid_size,
        int32_t grid_dim, int32_t group_size, int32_t n_threads, bool gpu, uint8_t * out);
LLAMA_API int32_t aquakv_op_decode(
        const uint8_t * rows, int64_t n_rows, int32_t n_channels, const float * grid, int32_t grid_size,
        int32_t grid_dim, int32_t group_size, int32_t n_threads, bool gpu, float * out);

// RoPE + f16 cast of x [n_tokens][n_head][head_dim] f32 at positions pos (plain RoPE with
// freq_base, NORM or NEOX pairing): fused = ggml_aquakv_rope_f16 with its rotation table built
// as the cache graph builds it, else ggml_rope_ext then ggml_cast (upstream); out: f16 bits of
// the same shape. cast: ggml_aquakv_rope_f16 without rotation, x [n_rows][n_channels] -> f16.
// Both return 0, or -1 (logged).
LLAMA_API int32_t aquakv_op_rope_f16(
        const float * x, const int32_t * pos, int64_t n_tokens, int32_t head_dim, int32_t n_head, int32_t neox,
        float freq_base, int32_t n_threads, bool gpu, bool fused, uint16_t * out);
LLAMA_API int32_t aquakv_op_cast_f16(
        const float * x, int64_t n_rows, int32_t n_channels, int32_t n_threads, bool gpu, uint16_t * out);

// 1 when the context's memory is the AQUA-KV cache, 0 otherwise. When it is and out is not
// NULL: out[0] = bytes of codes + scales, out[1] = bytes of the f16 window, out[2] = cells per
// stream, out[3] = streams, out[4] = window slots per stream.
LLAMA_API int32_t aquakv_context_cache_info(const struct llama_context * ctx, int64_t * out);

// Per-op profile (contexts created while AQUAKV_PROFILE is set in the environment compute one
// node at a time): reset clears the totals and turns recording on or off; write saves a TSV
// (op, node name without layer, calls, seconds; slowest first) and returns its row count or -1.
LLAMA_API void    aquakv_profile_reset(bool recording);
LLAMA_API int32_t aquakv_profile_write(const char * path);

#ifdef __cplusplus
}
#endif
