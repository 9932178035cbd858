# semdask: every target sets itself up on a fresh machine.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed
DEMO_ARGS ?=

.PHONY: demo test test-all lint typecheck bench clean install

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first (the local CPU wheel), then the package: a bare torch spec would resolve to CUDA.
$(STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/semdask demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/ruff check semdask tests benchmarks examples
	$(BIN)/mypy
	$(PY) -m pytest -m "not slow" semdask tests

test-all: $(STAMP)
	$(PY) -m pytest semdask tests

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,bench]"
	$(PY) benchmarks/inference.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
