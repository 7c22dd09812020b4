# The two commands a user needs:
#   make run   - install everything, then `dvc repro` the default pipeline
#   make test  - install everything, then run the lint gate and the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run test lint bench clean

$(BIN)/adaseg: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, by exact version: the CPU build on CPU-only machines
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/adaseg

run: install
	$(BIN)/dvc repro

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install lint
	$(BIN)/pytest -q

bench: install
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/repro_seeds.py --seeds 0 1 2

clean:
	rm -rf .adaseg mlruns.db mlartifacts
