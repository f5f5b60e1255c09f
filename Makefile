# Quick start: `make demo` and `make test` each create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On Python 3.11, torch 2.13.0 (a CPU build is cached on these machines) satisfies the stack tested here;
# on newer Pythons pip resolves the newest torch that scvi-tools accepts.
TORCH_SPEC ?= $(shell $(PYTHON) -c 'import sys; print("torch==2.13.0" if sys.version_info[:2] == (3, 11) else "torch")')

.PHONY: demo test test-quick bench docs tutorials tutorials-check test-interop release-check clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/sams-scvi demo --output demo_output

test: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

# The fast subset while developing (a few minutes): everything but the tests marked slow. `make test` runs all.
test-quick: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -m "not slow"

# Extras on top of the test environment: documentation, scverse evaluation tools, packaging.
$(BIN)/.doc: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e ".[doc]"
	touch $@

$(BIN)/.interop: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e ".[interop]"
	touch $@

$(BIN)/.release: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e ".[release]"
	touch $@

# The documentation site, offline, with warnings as errors (the notebooks render with their stored outputs).
docs: $(BIN)/.doc
	rm -rf docs/_build docs/generated
	PYTHONWARNINGS=ignore::DeprecationWarning $(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

# Re-execute the tutorials at full size and store their outputs (a few minutes each on 2 CPU cores).
tutorials: $(BIN)/.doc $(BIN)/.interop
	$(BIN)/python docs/tutorials/execute.py

# CI: execute the tutorials at reduced size (SAMS_TUTORIAL_MAX_EPOCHS=2), writing nothing back.
tutorials-check: $(BIN)/.doc $(BIN)/.interop
	$(BIN)/python docs/tutorials/execute.py --check

# Our outputs in cell-eval and pertpy (tests/interop; they skip, with the reason, without the tools).
test-interop: $(BIN)/.interop
	$(BIN)/python -m pytest tests/interop

# Build the wheel and sdist, check them with twine, install the wheel into a fresh environment and use it.
release-check: $(BIN)/.release
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" BIN=$(BIN) .ci/release_check.sh

# Training-step and prediction timings against scVI; writes benchmarks/RESULTS.md (BENCH_ARGS=--quick for a smoke test).
bench: $(BIN)/.installed
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo_output docs/_build docs/generated dist
