# Every target is self-contained: it creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch 2.13.0 lies on this machine's disk; override on a GPU box, e.g.
#   make test TORCH_SPEC='torch==2.14.1'
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/autoquant demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_kernels.py --quick
	$(BIN)/python benchmarks/bench_e2e.py --quick
	$(BIN)/python benchmarks/bench_cache.py --quick

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
