# Two set-up commands (see README): `make demo` runs the quickstart, `make test` the test suite.
# Each creates its virtualenv and installs what it needs with pip.
# torch is installed first through TORCH, so a GPU user can pick another build:
#   make test TORCH=torch
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint venv adapters-venv bench bench-perf bench-perf-autocast bench-perf-compile bench-perf-gpu bench-perf-gpu-autocast bench-perf-gpu-compile gpu-check mutate clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-install when the project metadata changes. The example third-party plugin
# is installed for real (its entry point), as a user would: tests use it.
$(VENV)/.installed: pyproject.toml examples/peftkit-loha/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,registry]"
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e examples/peftkit-loha
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python examples/quickstart.py

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The edit loop: everything but the tests marked slow (wheel builds, real training).
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# ruff with the rules in pyproject.toml ([tool.ruff]); ruff comes with the test extra.
lint: $(VENV)/.installed
	$(BIN)/python -m ruff check .

# A second virtualenv with AdapterHub's `adapters` library (it pins its own transformers),
# used by tests/test_adapterhub_*.py to check peftkit's AdapterHub format against the real
# library. Rebuilt when ADAPTERS_REQ changes (the stamp file records it).
ADAPTERS_REQ ?= adapters==1.3.0
ADAPTERS_VENV ?= .venv-adapters
ADAPTERS_STAMP := $(ADAPTERS_VENV)/.installed-$(subst =,-,$(ADAPTERS_REQ))

$(ADAPTERS_STAMP):
	rm -rf $(ADAPTERS_VENV)
	$(PYTHON) -m venv $(ADAPTERS_VENV)
	$(ADAPTERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(ADAPTERS_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(ADAPTERS_VENV)/bin/python -m pip install -q "$(ADAPTERS_REQ)" safetensors
	touch $@

adapters-venv: $(ADAPTERS_STAMP)

bench: $(VENV)/.installed
	$(BIN)/python bench/bench_lora.py

# Every built-in method's step, forward and memory next to peft; writes docs/performance.md
bench-perf: $(VENV)/.installed
	$(BIN)/python bench/perf_table.py

# The same table for a float32 model under bfloat16 autocast; writes docs/performance-autocast.md
bench-perf-autocast: $(VENV)/.installed
	$(BIN)/python bench/perf_table.py --autocast bfloat16

# The same table with every model torch.compile'd (inductor); writes docs/performance-compile.md
bench-perf-compile: $(VENV)/.installed
	$(BIN)/python bench/perf_table.py --compile

# The same table on a GPU in bfloat16 at a size that keeps it busy; writes docs/performance-gpu.md
bench-perf-gpu: $(VENV)/.installed
	$(BIN)/python bench/perf_table.py --device cuda --dtype bfloat16 --size large --budget 20

# The GPU table for a float32 model under bfloat16 autocast; writes docs/performance-gpu-autocast.md
bench-perf-gpu-autocast: $(VENV)/.installed
	$(BIN)/python bench/perf_table.py --device cuda --autocast bfloat16 --size large --budget 20

# The GPU table with every model torch.compile'd (Triton kernels); writes docs/performance-gpu-compile.md
bench-perf-gpu-compile: $(VENV)/.installed
	$(BIN)/python bench/perf_table.py --device cuda --dtype bfloat16 --size large --budget 20 --compile

# On a GPU machine, the checks that need one, in one short run: the tests with CUDA cases (skipped
# elsewhere) and bench/gpu_check.py (correctness, then timings against peft); then bench-perf-gpu.
GPU_TESTS = tests/test_composition_cuda.py tests/test_autocast_fused.py tests/test_values_lora_fused.py
gpu-check: $(VENV)/.installed
	$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: torch.cuda.is_available() is False')"
	$(BIN)/python -m pytest -q $(GPU_TESTS)
	$(BIN)/python bench/gpu_check.py

# Mutation testing (not part of CI; see docs/testing.md): mutmut over the modules of
# bench/mutation_map.toml, one at a time, each with its mapped tests; report in docs/mutation.md.
#   make mutate MUTATE_ARGS="plugins/lora/layer.py --max-children 2"
MUTATE_ARGS ?=

$(VENV)/.installed-mutate: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[mutate]"
	touch $@

mutate: $(VENV)/.installed-mutate
	$(BIN)/python bench/mutate.py $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) $(ADAPTERS_VENV) build dist *.egg-info
