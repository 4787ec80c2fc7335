// aquakv-gguf: flat C API for the Python bindings (see native/include/aquakv-capi.h).

#include "aquakv-capi.h"
#include "aquakv-profile.h"

#include "ggml.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

namespace {

// Enough to hold a model load's info lines and a failure's explanation; old lines are
// dropped first. Debug lines (one per tensor while loading) are echoed but not retained.
constexpr size_t AQUAKV_LOG_MAX_LINES = 1000;

struct aquakv_log_state {
    std::mutex              mutex;
    std::deque<std::string> lines;
    std::string             partial;  // llama.cpp sometimes logs one line in pieces
    int32_t                 echo_level = GGML_LOG_LEVEL_WARN;
    enum ggml_log_level     last_level = GGML_LOG_LEVEL_INFO;  // what a CONT piece continues
};

aquakv_log_state & log_state() {
    static aquakv_log_state state;
    return state;
}

void aquakv_log_callback(enum ggml_log_level level, const char * text, void * /*user_data*/) {
    auto & st = log_state();
    std::lock_guard<std::mutex> lock(st.mutex);
    if (level != GGML_LOG_LEVEL_CONT) {
        st.last_level = level;
    }
    if (st.echo_level >= 0 && (int32_t) st.last_level >= st.echo_level) {
        fputs(text, stderr);
    }
    if (st.last_level == GGML_LOG_LEVEL_DEBUG) {
        return;
    }
    st.partial += text;
    size_t start = 0;
    for (size_t nl; (nl = st.partial.find('\n', start)) != std::string::npos; start = nl + 1) {
        st.lines.emplace_back(st.partial.substr(start, nl - start));
        if (st.lines.size() > AQUAKV_LOG_MAX_LINES) {
            st.lines.pop_front();
        }
    }
    st.partial.erase(0, start);
}

void aquakv_log_error(const std::string & msg) {
    aquakv_log_callback(GGML_LOG_LEVEL_ERROR, (msg + "\n").c_str(), nullptr);
}

// Parses one "key=type:value" entry into ov; returns false with a reason in err.
bool parse_kv_override(const std::string & entry, llama_model_kv_override & ov, std::string & err) {
    const size_t eq = entry.find('=');
    const size_t colon = eq == std::string::npos ? std::string::npos : entry.find(':', eq);
    if (eq == std::string::npos || colon == std::string::npos) {
        err = "expected key=type:value";
        return false;
    }
    const std::string key  = entry.substr(0, eq);
    const std::string type = entry.substr(eq + 1, colon - eq - 1);
    const std::string val  = entry.substr(colon + 1);
    if (key.empty() || key.size() >= sizeof(ov.key)) {
        err = "key is empty or longer than 127 bytes";
        return false;
    }
    std::memset(&ov, 0, sizeof(ov));
    std::strncpy(ov.key, key.c_str(), sizeof(ov.key) - 1);
    char * end = nullptr;
    if (type == "int") {
        ov.tag = LLAMA_KV_OVERRIDE_TYPE_INT;
        ov.val_i64 = std::strtoll(val.c_str(), &end, 10);
    } else if (type == "float") {
        ov.tag = LLAMA_KV_OVERRIDE_TYPE_FLOAT;
        ov.val_f64 = std::strtod(val.c_str(), &end);
    } else if (type == "bool") {
        ov.tag = LLAMA_KV_OVERRIDE_TYPE_BOOL;
        if (val != "true" && val != "false") {
            err = "bool value must be true or false";
            return false;
        }
        ov.val_bool = val == "true";
        return true;
    } else if (type == "str") {
        ov.tag = LLAMA_KV_OVERRIDE_TYPE_STR;
        if (val.size() >= sizeof(ov.val_str)) {
            err = "str value longer than 127 bytes";
            return false;
        }
        std::strncpy(ov.val_str, val.c_str(), sizeof(ov.val_str) - 1);
        return true;
    } else {
        err = "type must be int, float, bool or str";
        return false;
    }
    if (val.empty() || end == nullptr || *end != '\0') {
        err = "value is not a number";
        return false;
    }
    return true;
}

} // namespace

void aquakv_log_capture(int32_t echo_level) {
    {
        auto & st = log_state();
        std::lock_guard<std::mutex> lock(st.mutex);
        st.echo_level = echo_level;
    }
    llama_log_set(aquakv_log_callback, nullptr);
}

size_t aquakv_log_tail(char * buf, size_t buf_size) {
    auto & st = log_state();
    std::lock_guard<std::mutex> lock(st.mutex);
    std::string text;
    for (const auto & line : st.lines) {
        text += line;
        text += '\n';
    }
    if (buf != nullptr && buf_size > 0) {
        const size_t n = std::min(text.size(), buf_size - 1);
        std::memcpy(buf, text.data(), n);
        buf[n] = '\0';
    }
    return text.size();
}

void aquakv_log_clear(void) {
    auto & st = log_state();
    std::lock_guard<std::mutex> lock(st.mutex);
    st.lines.clear();
    st.partial.clear();
}

int32_t aquakv_type_from_name(const char * name) {
    if (name == nullptr) {
        return -1;
    }
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * tn = ggml_type_name((enum ggml_type) t);
        if (tn != nullptr && std::strcmp(tn, name) == 0 && ggml_type_size((enum ggml_type) t) > 0) {
            return t;
        }
    }
    return -1;
}

struct llama_model * aquakv_model_load(
        const char * path, int32_t n_gpu_layers, bool use_mmap, bool vocab_only,
        const char * kv_overrides) {
    try {
        std::vector<llama_model_kv_override> overrides;
        if (kv_overrides != nullptr && kv_overrides[0] != '\0') {
            std::string all(kv_overrides);
            size_t start = 0;
            while (start <= all.size()) {
                size_t nl = all.find('\n', start);
                if (nl == std::string::npos) {
                    nl = all.size();
                }
                const std::string entry = all.substr(start, nl - start);
                if (!entry.empty()) {
                    llama_model_kv_override ov;
                    std::string err;
                    if (!parse_kv_override(entry, ov, err)) {
                        aquakv_log_error("aquakv: invalid kv override '" + entry + "': " + err);
                        return nullptr;
                    }
                    overrides.push_back(ov);
                }
                start = nl + 1;
            }
            llama_model_kv_override end;
            std::memset(&end, 0, sizeof(end));
            overrides.push_back(end);  // the loader stops at an empty key
        }
        llama_model_params params = llama_model_default_params();
        params.n_gpu_layers = n_gpu_layers;
        if (!use_mmap) {
            params.load_mode = LLAMA_LOAD_MODE_NONE;  // otherwise keep llama.cpp's choice (auto)
        }
        params.vocab_only   = vocab_only;
        params.kv_overrides = overrides.empty() ? nullptr : overrides.data();
        return llama_model_load_from_file(path, params);
    } catch (const std::exception & e) {
        aquakv_log_error(std::string("aquakv: model load failed: ") + e.what());
        return nullptr;
    }
}

struct llama_context * aquakv_context_new(
        struct llama_model * model, uint32_t n_ctx, uint32_t n_batch, uint32_t n_ubatch,
        uint32_t n_seq_max, int32_t n_threads, int32_t type_k, int32_t type_v,
        int32_t flash_attn, bool kv_unified, bool offload_kqv, bool op_offload) {
    try {
        llama_context_params params = llama_context_default_params();
        params.n_ctx = n_ctx;
        if (n_batch > 0) {
            params.n_batch = n_batch;
        }
        if (n_ubatch > 0) {
            params.n_ubatch = n_ubatch;
        }
        if (n_seq_max > 0) {
            params.n_seq_max = n_seq_max;
        }
        if (n_threads > 0) {
            params.n_threads       = n_threads;
            params.n_threads_batch = n_threads;
        }
        if (type_k < 0 || type_k >= GGML_TYPE_COUNT || type_v < 0 || type_v >= GGML_TYPE_COUNT) {
            aquakv_log_error("aquakv: invalid cache type id");
            return nullptr;
        }
        params.type_k          = (enum ggml_type) type_k;
        params.type_v          = (enum ggml_type) type_v;
        params.flash_attn_type = (enum llama_flash_attn_type) flash_attn;
        params.kv_unified      = kv_unified;
        params.offload_kqv     = offload_kqv;
        params.op_offload      = op_offload;
        if (const char * dir = std::getenv("AQUAKV_DEBUG_DUMP_DIR")) {
            // debugging aid: every computed tensor whose name starts with "aquakv_" is appended to
            // DIR/<name>.f32 (float32 rows), so the native reconstructions can be compared with the
            // torch reference's
            static std::string dump_dir;
            dump_dir = dir;
            params.cb_eval = [](struct ggml_tensor * t, bool ask, void *) -> bool {
                const bool wanted = std::strncmp(t->name, "aquakv_", 7) == 0 && std::strchr(t->name, ' ') == nullptr &&
                                    t->type == GGML_TYPE_F32 && ggml_is_contiguous(t);
                if (ask || !wanted) {
                    return wanted;
                }
                std::vector<float> buf(ggml_nelements(t));
                ggml_backend_tensor_get(t, buf.data(), 0, ggml_nbytes(t));
                FILE * f = std::fopen((dump_dir + "/" + t->name + ".f32").c_str(), "ab");
                if (f) {
                    std::fwrite(buf.data(), sizeof(float), buf.size(), f);
                    std::fclose(f);
                }
                return true;
            };
        }
        if (std::getenv("AQUAKV_PROFILE") != nullptr) {
            params.cb_eval = aquakv_profile_eval_callback;
        }
        return llama_init_from_model(model, params);
    } catch (const std::exception & e) {
        aquakv_log_error(std::string("aquakv: context creation failed: ") + e.what());
        return nullptr;
    }
}

int32_t aquakv_decode(
        struct llama_context * ctx, const llama_token * tokens, const llama_pos * pos,
        const llama_seq_id * seq_ids, const int8_t * want_logits, int32_t n_tokens) {
    if (n_tokens <= 0) {
        aquakv_log_error("aquakv: decode called with no tokens");
        return -1;
    }
    llama_batch batch = llama_batch_init(n_tokens, 0, 1);
    for (int32_t i = 0; i < n_tokens; ++i) {
        batch.token[i]     = tokens[i];
        batch.pos[i]       = pos[i];
        batch.n_seq_id[i]  = 1;
        batch.seq_id[i][0] = seq_ids[i];
        batch.logits[i]    = want_logits[i];
    }
    batch.n_tokens = n_tokens;
    int32_t ret;
    try {
        ret = llama_decode(ctx, batch);
    } catch (const std::exception & e) {
        aquakv_log_error(std::string("aquakv: decode failed: ") + e.what());
        ret = -3;
    }
    llama_batch_free(batch);
    return ret;
}

int32_t aquakv_tokenize(
        const struct llama_vocab * vocab, const char * text, int32_t text_len, llama_token * tokens,
        int32_t n_tokens_max, bool add_special, bool parse_special) {
    try {
        return llama_tokenize(vocab, text, text_len, tokens, n_tokens_max, add_special, parse_special);
    } catch (const std::exception & e) {
        aquakv_log_error(std::string("aquakv: tokenize failed: ") + e.what());
        return AQUAKV_ERR_EXCEPTION;
    }
}

int32_t aquakv_token_to_piece(
        const struct llama_vocab * vocab, llama_token token, char * buf, int32_t length, bool special) {
    try {
        return llama_token_to_piece(vocab, token, buf, length, 0, special);
    } catch (const std::exception & e) {
        aquakv_log_error(std::string("aquakv: token_to_piece failed: ") + e.what());
        return AQUAKV_ERR_EXCEPTION;
    }
}

int32_t aquakv_detokenize(
        const struct llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens, char * text,
        int32_t text_len_max, bool remove_special, bool unparse_special) {
    try {
        return llama_detokenize(vocab, tokens, n_tokens, text, text_len_max, remove_special, unparse_special);
    } catch (const std::exception & e) {
        aquakv_log_error(std::string("aquakv: detokenize failed: ") + e.what());
        return AQUAKV_ERR_EXCEPTION;
    }
}
