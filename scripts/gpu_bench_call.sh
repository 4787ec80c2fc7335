#!/usr/bin/env bash
# One device call for issue 5: build (or reinstall a carried wheel), the CUDA parity tests, then
# bench/bench_gpu_cache.py within the time left. Everything lands in $OUT: results.tgz (logs,
# raw llama-bench JSON, summary.json) and, after a build, the wheel in <= 16 MiB parts.
# Usage: bash scripts/gpu_bench_call.sh TESTS(yes|no) BUDGET_S SHAPES CACHES...
set -uo pipefail
OUT=${OUT:-/tmp/out}
tests=$1; budget=$2; shapes=$3; shift 3
caches=("$@")
t_start=$(date +%s)
R=$OUT/r && mkdir -p "$R"
OUT=$R bash scripts/gpu_build_and_test.sh build || { tar czf "$OUT/results.tgz" -C "$R" .; exit 1; }
if [[ ! -f .gpu_wheel/NAME ]]; then
    whl=$(ls /tmp/wheel/*.whl) && size=$(stat -c %s "$whl") && echo "wheel $(basename "$whl") $size bytes" | tee -a "$R/build-time.txt"
    if (( size <= 47 * 1024 * 1024 )); then
        mkdir -p "$OUT/wheel" && basename "$whl" > "$OUT/wheel/NAME" && split -b 15M -d "$whl" "$OUT/wheel/part"
    fi
fi
export PYTHONPATH=/tmp/site AQUAKV_CACHE_DIR=/tmp/aquakv-cache PYTHONUNBUFFERED=1
if [[ $tests == yes ]]; then
    # the oracle tests compare with the torch reference: f32 products, like the reference
    AQUAKV_PREDICT_PREC=f32 OUT=$R bash scripts/gpu_build_and_test.sh test tests/native/test_aquakv_cache.py \
        -k "perplexity_ratio or channel_order or block_diagonal" ; cp "$R/gpu-tests.log" "$R/gpu-tests-oracle-f32.log"
    # CUDA vs CPU parity and the synthetic models, in the default precision (f16 products on the GPU)
    OUT=$R bash scripts/gpu_build_and_test.sh test tests/native/test_aquakv_cuda.py tests/testing/test_synth_gguf.py
    cp "$R/gpu-tests.log" "$R/gpu-tests-cuda.log"
    # informative: the oracle comparison with f16 products
    AQUAKV_PREDICT_PREC=auto OUT=$R bash scripts/gpu_build_and_test.sh test tests/native/test_aquakv_cache.py \
        -k "perplexity_ratio" ; cp "$R/gpu-tests.log" "$R/gpu-tests-oracle-auto.log"
fi
left=$(( budget - ($(date +%s) - t_start) ))
echo "bench budget ${left}s"
python3 bench/bench_gpu_cache.py run --shapes $shapes --caches "${caches[@]}" --out "$R/bench" \
    --work /tmp/aquakv-synth --budget-s "$left" 2>&1 | grep -v '^ ' | tee "$R/bench.log"
nvidia-smi > "$R/nvidia-smi.txt" 2>&1
tar czf "$OUT/results.tgz" -C "$R" . && rm -rf "$R"
