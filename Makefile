# aquakv-gguf: the two set-up commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
PIP := $(PYTHON) -m pip --disable-pip-version-check
export CCACHE_DIR ?= $(HOME)/.cache/ccache
# paths relative to the checkout, so another clone (CI) reuses the same cache entries
export CCACHE_BASEDIR ?= $(CURDIR)
export CCACHE_NOHASHDIR ?= 1
export PIP_ROOT_USER_ACTION := ignore

.PHONY: deps build demo test test-fast clean

# System packages (ccache for rebuilds) and Python packages; torch pinned to the CPU build.
deps:
	@command -v ccache >/dev/null || (apt-get update -qq && apt-get install -y -qq ccache) \
		|| echo "[aquakv] ccache not installed: rebuilds will be slower"
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q scikit-build-core cmake ninja cffi numpy tqdm gguf transformers accelerate \
		safetensors sentencepiece psutil pytest

# Fetch the pinned llama.cpp (hash-checked, cached) and build + install the package.
build: deps
	$(PYTHON) third_party/fetch_llama_cpp.py
	@mkdir -p build
	@echo "[aquakv] building the patched llama.cpp (log: build/pip-install.log)"
	@start=$$(date +%s); $(PIP) install --no-build-isolation --no-deps -v . > build/pip-install.log 2>&1 \
		|| { tail -n 80 build/pip-install.log; echo "[aquakv] build failed"; exit 1; }; \
		echo "[aquakv] build + install took $$(( $$(date +%s) - start ))s"
	$(PYTHON) -c "from aquakv_gguf.runtime import build_info; print('[aquakv] built', build_info())"

demo: build
	$(PYTHON) -m aquakv_gguf.demo

test: build
	$(PYTHON) -m pytest -q tests

test-fast:
	$(PYTHON) -m pytest -q tests -x

clean:
	rm -rf build dist *.egg-info
