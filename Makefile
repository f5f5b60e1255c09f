# Quick start: `make demo` and `make test` each create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On Python 3.11, torch 2.13.0 (a CPU build is cached on these machines) satisfies the stack tested here;
# on newer Pythons pip resolves the newest torch that scvi-tools accepts.
TORCH_SPEC ?= $(shell $(PYTHON) -c 'import sys; print("torch==2.13.0" if sys.version_info[:2] == (3, 11) else "torch")')

.PHONY: demo test bench lint clean

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

# Training-step and prediction timings against scVI; writes benchmarks/RESULTS.md (BENCH_ARGS=--quick for a smoke test).
bench: $(BIN)/.installed
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo_output
