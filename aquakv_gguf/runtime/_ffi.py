"""cffi (ABI mode) declarations for the patched libllama and the loaded library handle.

Only functions with scalar, string and plain-array arguments are declared: parameter
structs are filled on the C side (``native/include/aquakv-capi.h``), so an upstream
change of their layout cannot corrupt memory here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

import cffi

from aquakv_gguf.paths import libllama_path

CDEF = r"""
typedef int32_t llama_token;
typedef int32_t llama_pos;
typedef int32_t llama_seq_id;
struct llama_model;
struct llama_context;
struct llama_vocab;
struct llama_memory_i;
typedef struct llama_memory_i * llama_memory_t;

void llama_backend_init(void);
const char * llama_print_system_info(void);
const char * llama_aquakv_build_info(void);
bool llama_supports_gpu_offload(void);

void   aquakv_log_capture(int32_t echo_level);
size_t aquakv_log_tail(char * buf, size_t buf_size);
void   aquakv_log_clear(void);
int32_t aquakv_type_from_name(const char * name);
struct llama_model * aquakv_model_load(const char * path, int32_t n_gpu_layers, bool use_mmap,
                                       bool vocab_only, const char * kv_overrides);
struct llama_context * aquakv_context_new(struct llama_model * model, uint32_t n_ctx, uint32_t n_batch,
                                          uint32_t n_ubatch, uint32_t n_seq_max, int32_t n_threads,
                                          int32_t type_k, int32_t type_v, int32_t flash_attn,
                                          bool kv_unified, bool offload_kqv, bool op_offload);
int32_t aquakv_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len,
                        llama_token * tokens, int32_t n_tokens_max, bool add_special, bool parse_special);
int32_t aquakv_token_to_piece(const struct llama_vocab * vocab, llama_token token, char * buf, int32_t length,
                              bool special);
int32_t aquakv_detokenize(const struct llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens,
                          char * text, int32_t text_len_max, bool remove_special, bool unparse_special);
int32_t aquakv_decode(struct llama_context * ctx, const llama_token * tokens, const llama_pos * pos,
                      const llama_seq_id * seq_ids, const int8_t * want_logits, int32_t n_tokens);

int64_t aquakv_op_row_bytes(int32_t n_channels, int32_t group_size, int32_t grid_dim, int32_t grid_size);
int32_t aquakv_op_encode(const float * x, int64_t n_rows, int32_t n_channels, const float * grid, int32_t grid_size,
                         int32_t grid_dim, int32_t group_size, int32_t n_threads, bool gpu, uint8_t * out);
int32_t aquakv_op_decode(const uint8_t * rows, int64_t n_rows, int32_t n_channels, const float * grid,
                         int32_t grid_size, int32_t grid_dim, int32_t group_size, int32_t n_threads, bool gpu,
                         float * out);
int32_t aquakv_op_rope_f16(const float * x, const int32_t * pos, int64_t n_tokens, int32_t head_dim, int32_t n_head,
                           int32_t neox, float freq_base, int32_t n_threads, bool gpu, bool fused, uint16_t * out);
int32_t aquakv_op_cast_f16(const float * x, int64_t n_rows, int32_t n_channels, int32_t n_threads, bool gpu,
                           uint16_t * out);
int32_t aquakv_context_cache_info(const struct llama_context * ctx, int64_t * out);
void    aquakv_profile_reset(bool recording);
int32_t aquakv_profile_write(const char * path);

void llama_model_free(struct llama_model * model);
void llama_free(struct llama_context * ctx);

const struct llama_vocab * llama_model_get_vocab(const struct llama_model * model);
int32_t llama_model_n_ctx_train(const struct llama_model * model);
int32_t llama_model_n_embd(const struct llama_model * model);
int32_t llama_model_n_layer(const struct llama_model * model);
int32_t llama_model_n_head(const struct llama_model * model);
int32_t llama_model_n_head_kv(const struct llama_model * model);
int32_t llama_model_desc(const struct llama_model * model, char * buf, size_t buf_size);
uint64_t llama_model_size(const struct llama_model * model);
uint64_t llama_model_n_params(const struct llama_model * model);
int32_t llama_model_meta_val_str(const struct llama_model * model, const char * key, char * buf, size_t buf_size);
int32_t llama_model_meta_count(const struct llama_model * model);
int32_t llama_model_meta_key_by_index(const struct llama_model * model, int32_t i, char * buf, size_t buf_size);

int32_t llama_vocab_n_tokens(const struct llama_vocab * vocab);
llama_token llama_vocab_bos(const struct llama_vocab * vocab);
llama_token llama_vocab_eos(const struct llama_vocab * vocab);
bool llama_vocab_is_eog(const struct llama_vocab * vocab, llama_token token);
bool llama_vocab_get_add_bos(const struct llama_vocab * vocab);

uint32_t llama_n_ctx(const struct llama_context * ctx);
uint32_t llama_n_batch(const struct llama_context * ctx);
uint32_t llama_n_ubatch(const struct llama_context * ctx);
uint32_t llama_n_seq_max(const struct llama_context * ctx);
void llama_set_n_threads(struct llama_context * ctx, int32_t n_threads, int32_t n_threads_batch);
void llama_synchronize(struct llama_context * ctx);
float * llama_get_logits_ith(struct llama_context * ctx, int32_t i);

llama_memory_t llama_get_memory(const struct llama_context * ctx);
void llama_memory_clear(llama_memory_t mem, bool data);
bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
void llama_memory_seq_cp(llama_memory_t mem, llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1);
void llama_memory_seq_keep(llama_memory_t mem, llama_seq_id seq_id);
void llama_memory_seq_add(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos delta);
llama_pos llama_memory_seq_pos_min(llama_memory_t mem, llama_seq_id seq_id);
llama_pos llama_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id);

size_t llama_state_get_size(struct llama_context * ctx);
size_t llama_state_get_data(struct llama_context * ctx, uint8_t * dst, size_t size);
size_t llama_state_set_data(struct llama_context * ctx, const uint8_t * src, size_t size);
size_t llama_state_seq_get_size(struct llama_context * ctx, llama_seq_id seq_id);
size_t llama_state_seq_get_data(struct llama_context * ctx, uint8_t * dst, size_t size, llama_seq_id seq_id);
size_t llama_state_seq_set_data(struct llama_context * ctx, const uint8_t * src, size_t size, llama_seq_id dest_seq_id);
"""

AQUAKV_ERR_EXCEPTION = -(2**31)  # aquakv-capi.h: an exception was caught inside llama.cpp

ffi = cffi.FFI()
ffi.cdef(CDEF)

_lock = threading.Lock()
_lib = None


def _preload_cxx_runtime() -> None:
    """Put the system C++ runtime in the global symbol scope before libllama is opened.

    A llama.cpp executable links libstdc++ itself, so every library it loads binds the C++
    runtime's symbols there. A Python process does not: without this, libllama's std::regex
    (used by the tokenizer) can bind locale-facet symbols that libggml-cuda.so also exports,
    and crashes while loading a model (seen with the CUDA build).
    """
    if os.name != "posix":
        return
    name = ctypes.util.find_library("stdc++") or "libstdc++.so.6"
    try:
        ctypes.CDLL(name, mode=os.RTLD_GLOBAL)
    except OSError:
        pass  # not a GNU toolchain build: nothing to preload


def lib():
    """The loaded libllama (loaded, backend-initialised and log-captured once per process)."""
    global _lib
    with _lock:
        if _lib is None:
            _preload_cxx_runtime()
            handle = ffi.dlopen(str(libllama_path()))
            handle.aquakv_log_capture(-1)
            handle.llama_backend_init()
            _lib = handle
        return _lib
