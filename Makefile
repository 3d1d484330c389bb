# Every target is self-contained: it creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch 2.13.0 lies on this machine's disk; override on a GPU box, e.g.
#   make test TORCH_SPEC='torch==2.14.1'
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

# test-compat: the whole suite on the GPU machine's software (torch 2.11.0 + triton 3.6.0; PyPI's
# torch 2.11 is a CUDA build, which runs on a CPU) and on the newest torch pip installs here, each in
# its own venv. numpy<2.4 for triton 3.6: its interpreter (the CPU kernel tests) converts loop bounds
# with int() on 1-D arrays, which numpy 2.4 rejects (kernels/_interpreter.py probes for it).
COMPAT_VERSIONS := 2.11 2.14
COMPAT_SPEC_2.11 := 'torch==2.11.0' 'triton==3.6.0' 'numpy<2.4'
COMPAT_SPEC_2.14 := 'torch==2.14.1'

.PHONY: demo test test-compat bench install clean

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

# One resolve per venv (torch pin, dev extras, editable install together), so nothing upgrades the pin.
.venv-compat-%/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-compat-$*
	.venv-compat-$*/bin/python -m pip install -q --upgrade pip
	.venv-compat-$*/bin/python -m pip install -q $(COMPAT_SPEC_$*) -e '.[dev]'
	touch $@

# Both suites run even when the first fails; the target fails if either did.
test-compat: $(foreach v,$(COMPAT_VERSIONS),.venv-compat-$(v)/.installed)
	@status=0; for v in $(COMPAT_VERSIONS); do \
		.venv-compat-$$v/bin/python -c 'import torch, triton; print("== test-compat: torch", torch.__version__, "triton", triton.__version__)'; \
		.venv-compat-$$v/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) || status=1; \
	done; exit $$status

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_kernels.py --quick
	$(BIN)/python benchmarks/bench_e2e.py --quick
	$(BIN)/python benchmarks/bench_cache.py --quick

clean:
	rm -rf $(VENV) .venv-compat-* .pytest_cache build *.egg-info
