# k2 — every target sets itself up first (a local .venv; CPU torch 2.13.0 unless one is present).
#
#   make demo      the tiny end-to-end pipeline on CPU, ending in a report
#   make test      the test suite
#   make bench     side-by-side benchmarks against transformers (writes benchmarks/RESULTS.md)
#
# Use your own torch: `make VENV_FLAGS=--system-site-packages ...` with a python that has it.

PYTHON     ?= python3
VENV       ?= .venv
VENV_FLAGS ?=
TORCH_PIN  ?= torch==2.13.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.k2-setup
K2         := $(BIN)/k2
PRESET     ?= tiny
export K2_ARTIFACTS ?= artifacts

.PHONY: setup demo test bench clean-artifacts help

help:
	@sed -n '1,9p' Makefile

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(K2) model init --preset $(PRESET) --out model
	$(K2) model info model:latest
	rm -rf $(K2_ARTIFACTS)/export/demo-hf
	$(K2) export model:latest --format hf --out $(K2_ARTIFACTS)/export/demo-hf
	$(K2) import-hf $(K2_ARTIFACTS)/export/demo-hf --out import
	$(K2) artifacts verify import:latest
	$(K2) artifacts list

bench: setup
	$(BIN)/python benchmarks/bench_model.py --out benchmarks/RESULTS.md

clean-artifacts:
	rm -rf $(K2_ARTIFACTS)
