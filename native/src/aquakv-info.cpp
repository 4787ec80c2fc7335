// aquakv-gguf: build identification of the AQUA-KV patch, compiled into libllama.
//
// Lets every consumer (the Python bindings, the tools' startup log) check that it runs
// the patched library and which pinned llama.cpp it was built from.

#include "llama.h"
#include "aquakv-build-config.h"

#ifndef AQUAKV_VERSION
#error "AQUAKV_VERSION must be defined by the build (CMakeLists.txt)"
#endif
#ifndef AQUAKV_LLAMA_CPP_COMMIT
#error "AQUAKV_LLAMA_CPP_COMMIT must be defined by the build (CMakeLists.txt)"
#endif

const char * llama_aquakv_build_info(void) {
    return "aquakv-gguf " AQUAKV_VERSION " (llama.cpp " AQUAKV_LLAMA_CPP_COMMIT ")";
}
