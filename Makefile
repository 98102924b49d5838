# Two entry points (the README quickstart): `make demo` runs the whole audit -> locate -> fix -> compare loop on the
# built-in lab world, `make test` runs the test suite. Both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Exact versions come from constraints.txt (what the suite ran with); pyproject.toml only declares ranges.
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, by exact version: pip then takes the local CPU build instead of a CUDA one.
	$(BIN)/pip install -q --constraint constraints.txt torch==2.13.0
	$(BIN)/pip install -q --constraint constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/debias demo --out runs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m benchmarks.run

# `make bench-fast`: every benchmark at its smallest size (the test suite runs this to check the runner).
bench-fast: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m benchmarks.run --fast --out runs/bench-fast.json

.PHONY: install demo test bench bench-fast
