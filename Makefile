# k2 — every target sets itself up first (a local .venv; CPU torch 2.13.0 unless one is present).
#
#   make demo      the tiny end-to-end pipeline on CPU, ending in a report (13 min on 2 idle cores)
#   make pipeline PRESET=small   the same chain at single-GPU scale
#   make test      the test suite (make test-browser: the web chat page in headless Chromium;
#                  make test-lmeval: the lm-evaluation-harness bridge, installing the lmeval extra)
#   make bench     side-by-side benchmarks against transformers (writes benchmarks/RESULTS.md; on CUDA: bf16, MFU)
#   make reproduce the K2 report's claims re-measured at small scale (reproduce/REPORT.md)
#   make reproduce-quick   the same experiments at micro size, a smoke run in minutes
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

.PHONY: setup demo pipeline chain test test-browser test-lmeval bench reproduce reproduce-quick clean-artifacts help

help:
	@sed -n '1,12p' Makefile

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

# The web chat page of `k2 serve` in a real browser: headless Chromium and ChromeDriver from Debian's
# packages, installed when missing (as root; elsewhere the test skips, saying why). CI runs it after `make test`.
test-browser: setup
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "note: could not install chromium; the browser tests will skip"
	$(BIN)/python -m pytest -q tests/test_web_chat.py

# `k2 eval --suite lm-eval:TASK` on local task YAMLs (no network): the lmeval extra is ~350 MB (scipy,
# scikit-learn, nltk), so `make test` leaves it out and its tests skip; this target installs it first.
test-lmeval: setup
	@$(BIN)/python -c "import lm_eval" 2>/dev/null || $(BIN)/python -m pip install -q "lm-eval>=0.4"
	$(BIN)/python -m pytest -q tests/test_lm_eval.py

# The pipeline, one stage per line, each skipped when its artifact is up to date with its recipe
# and inputs (`k2 --reuse`), so rerunning after an interruption continues where it stopped.
CHAIN_MODELS := pretrain midtrain extend-context sft rl

demo: setup
	@$(MAKE) --no-print-directory chain PRESET=tiny

pipeline: setup
	@$(MAKE) --no-print-directory chain PRESET=$(PRESET)

# `chain` assumes the environment is set up (the e2e test calls it with PRESET=micro).
chain:
	$(K2) --reuse data synth --recipe recipes/$(PRESET)/synth.toml
	$(K2) --reuse rephrase --recipe recipes/$(PRESET)/rephrase.toml
	$(K2) --reuse pretrain --recipe recipes/$(PRESET)/pretrain.toml
	$(K2) --reuse pretrain --recipe recipes/$(PRESET)/midtrain.toml --out midtrain
	$(K2) --reuse extend-context --recipe recipes/$(PRESET)/extend_context.toml
	$(K2) --reuse agentic --recipe recipes/$(PRESET)/agentic.toml
	$(K2) --reuse sft --recipe recipes/$(PRESET)/sft.toml
	$(K2) --reuse rl --recipe recipes/$(PRESET)/rl.toml
	$(K2) --reuse eval $(foreach m,$(CHAIN_MODELS),$(m):latest --label $(m)) --recipe recipes/$(PRESET)/eval.toml
	$(K2) --reuse report eval:latest
	@echo "report: $$($(K2) artifacts path report:latest)/REPORT.md"

bench: setup
	$(BIN)/python benchmarks/bench_model.py --out benchmarks/RESULTS.md
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_corpus.py --tokens 100e6 --out benchmarks/RESULTS.md

# The K2 report's claims re-measured at small scale (REPRO_PRESET=gpu on one GPU): reproduce/REPORT.md
REPRO_PRESET ?= cpu
reproduce: setup
	$(BIN)/python reproduce/run.py --preset $(REPRO_PRESET)

# Every experiment at micro size (minutes): a smoke run whose report goes under reproduce/artifacts/quick
reproduce-quick: setup
	$(BIN)/python reproduce/run.py --quick

clean-artifacts:
	rm -rf $(K2_ARTIFACTS)
