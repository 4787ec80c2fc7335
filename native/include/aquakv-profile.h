// aquakv-gguf: the per-op profiler's eval callback (native/src/aquakv-profile.cpp), installed by
// aquakv_context_new when AQUAKV_PROFILE is set.
#pragma once

struct ggml_tensor;

bool aquakv_profile_eval_callback(struct ggml_tensor * t, bool ask, void * user_data);
