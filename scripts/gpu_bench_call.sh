#!/usr/bin/env bash
# One device call for issue 5: build (or reinstall a carried wheel), the CUDA parity tests, the
# per-op profile, then bench/bench_gpu_cache.py within the time left. Everything lands in $OUT:
# results.tgz (logs, raw llama-bench JSON, summary.json files, profiles) and, after a build, the
# wheel in 15 MiB parts (a later call carries them as .gpu_wheel/ and skips the build).
# Usage: [PROFILE="8b:aqua2:32768 ..."] [DEPTHS="0 32768"] bash scripts/gpu_bench_call.sh TESTS(yes|no) BUDGET_S SPEC...
#   SPEC = SHAPE:CACHE[,CACHE...]  e.g. 8b:f16,aqua2  8b:aqua2-lr  1b:all (any cache of bench_gpu_cache.py's CACHES)
set -uo pipefail
OUT=${OUT:-/tmp/out}
tests=$1; budget=$2; shift 2
t_start=$(date +%s)
R=$OUT/r && mkdir -p "$R"
OUT=$R bash scripts/gpu_build_and_test.sh build || { tar czf "$OUT/results.tgz" -C "$R" .; exit 1; }
if [[ ! -f .gpu_wheel/NAME ]]; then
    whl=$(ls /tmp/wheel/*.whl) && size=$(stat -c %s "$whl") && echo "wheel $(basename "$whl") $size bytes" | tee -a "$R/build-time.txt"
    if (( size <= 60 * 1024 * 1024 )); then
        mkdir -p "$OUT/wheel" && basename "$whl" > "$OUT/wheel/NAME" && split -b 15M -d "$whl" "$OUT/wheel/part"
    fi
fi
export PYTHONPATH=/tmp/site AQUAKV_CACHE_DIR=/tmp/aquakv-cache PYTHONUNBUFFERED=1
if [[ $tests == yes ]]; then
    # CUDA vs CPU parity and the synthetic models, in the default precision (f16 products on the GPU)
    OUT=$R bash scripts/gpu_build_and_test.sh test tests/native/test_aquakv_cuda.py tests/testing/test_synth_gguf.py
    cp "$R/gpu-tests.log" "$R/gpu-tests-cuda.log"
fi
left() { echo $(( budget - ($(date +%s) - t_start) )); }
for spec in "$@"; do
    shape=${spec%%:*}; caches=${spec#*:}
    [[ $caches == all ]] && caches="f16,aqua2,aqua2-lr,q8_0,q4_0,aqua3,aqua2-blk,aqua2-f32"
    echo "bench $shape ($caches): $(left) s left"
    python3 bench/bench_gpu_cache.py run --shapes "$shape" --caches ${caches//,/ } --out "$R/bench-$shape-$(date +%s)" \
        --work /tmp/aquakv-synth --budget-s "$(left)" ${DEPTHS:+--depths $DEPTHS} 2>&1 | grep -v '^ ' | grep -v '^[{}]' | tee -a "$R/bench.log"
    for p in ${PROFILE:-}; do
        IFS=: read -r pshape pcache depth <<< "$p"
        [[ $pshape == "$shape" ]] || continue
        (( $(left) > 60 )) || { echo "profile $p skipped: $(left) s left"; continue; }
        # an AQUA-KV variant profiles its own file (bench_gpu_cache.py writes those of the spec's
        # caches, e.g. .aqua2-lr.gguf); f16 and aqua2-f32 run on the aqua2 file
        case $pcache in
            f16|aqua2-f32) model=/tmp/aquakv-synth/$shape-q4_0.aqua2.gguf ;;
            *)             model=/tmp/aquakv-synth/$shape-q4_0.$pcache.gguf ;;
        esac
        [[ -f $model ]] || { echo "profile $p skipped: no $model (put $pcache in the spec's caches)"; continue; }
        en=1; [[ $pcache == f16 ]] && en=0
        prec=auto; [[ $pcache == aqua2-f32 ]] && prec=f32
        AQUAKV_ENABLED=$en AQUAKV_PREDICT_PREC=$prec timeout $(( $(left) - 20 )) python3 bench/profile_gpu_cache.py "$model" --depth "$depth" \
            --tokens 3 --out "$R/profile-$shape-$pcache-d$depth.tsv" > "$R/profile-$shape-$pcache-d$depth.log" 2>&1
        echo "profile $p rc=$?"; grep -A12 ms_per_token_by_op "$R/profile-$shape-$pcache-d$depth.log" | head -14
    done
done
nvidia-smi > "$R/nvidia-smi.txt" 2>&1
tar czf "$OUT/results.tgz" -C "$R" . && rm -rf "$R"
