// aquakv-gguf: a per-op time profile of llama.cpp graphs, for docs/PERF.md.
//
// With AQUAKV_PROFILE set when a context is created, its eval callback asks for every node, so
// the scheduler computes the graph one node at a time and synchronizes after each; the wall time
// between two callbacks is that node's time (plus a launch and a sync, ~10-30 us: only
// millisecond-scale entries are meaningful). Totals are kept per (op, node name without its
// layer suffix) while recording is on (aquakv_profile_reset(true)).

#include "aquakv-capi.h"
#include "aquakv-profile.h"

#include "ggml.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace {

struct profile_entry {
    double  seconds = 0.0;
    int64_t count   = 0;
};

struct profile_state {
    std::mutex mutex;
    bool recording = false;
    std::chrono::steady_clock::time_point last;
    std::map<std::pair<std::string, std::string>, profile_entry> totals;
};

profile_state & state() {
    static profile_state st;
    return st;
}

// "aquakv_k_hat-12" -> "aquakv_k_hat"; "Kcur-3 (view)" -> "Kcur (view)"
std::string name_class(const char * name) {
    std::string s(name);
    const size_t dash = s.find('-');
    if (dash == std::string::npos) {
        return s;
    }
    size_t end = dash + 1;
    while (end < s.size() && s[end] >= '0' && s[end] <= '9') {
        ++end;
    }
    return end > dash + 1 ? s.substr(0, dash) + s.substr(end) : s;
}

} // namespace

bool aquakv_profile_eval_callback(struct ggml_tensor * t, bool ask, void * /*user_data*/) {
    auto & st = state();
    std::lock_guard<std::mutex> lock(st.mutex);
    const auto now = std::chrono::steady_clock::now();
    if (ask) {
        return true;  // every node alone, synchronized
    }
    if (st.recording) {
        auto & e = st.totals[{ggml_op_desc(t), name_class(t->name)}];
        e.seconds += std::chrono::duration<double>(now - st.last).count();
        e.count   += 1;
    }
    st.last = now;
    return true;
}

void aquakv_profile_reset(bool recording) {
    auto & st = state();
    std::lock_guard<std::mutex> lock(st.mutex);
    st.totals.clear();
    st.recording = recording;
    st.last = std::chrono::steady_clock::now();
}

int32_t aquakv_profile_write(const char * path) {
    auto & st = state();
    std::lock_guard<std::mutex> lock(st.mutex);
    std::vector<std::pair<std::pair<std::string, std::string>, profile_entry>> rows(st.totals.begin(), st.totals.end());
    std::sort(rows.begin(), rows.end(), [](const auto & a, const auto & b) { return a.second.seconds > b.second.seconds; });
    FILE * f = std::fopen(path, "w");
    if (f == nullptr) {
        return -1;
    }
    std::fprintf(f, "op\tname\tcalls\tseconds\n");
    for (const auto & [key, e] : rows) {
        std::fprintf(f, "%s\t%s\t%lld\t%.6f\n", key.first.c_str(), key.second.c_str(), (long long) e.count, e.seconds);
    }
    std::fclose(f);
    return (int32_t) rows.size();
}
