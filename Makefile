# The README's commands. `make demo` and `make test` each create .venv and install on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch first: a bare `torch` requirement in a fresh venv pulls GBs of CUDA packages.
TORCH  ?= torch==2.13.0

.PHONY: install demo test test-fast lint clean

$(BIN)/medseg: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

install: $(BIN)/medseg

demo: install                     ## train Swin UNETR on the phantom, segment and score held-out cases (about 8 min on 2 CPU cores)
	BIN=$(BIN) bash scripts/demo.sh

test: install                     ## the whole suite, as CI runs it
	$(BIN)/python -m pytest -q

test-fast: install                ## everything but the slow training tests
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check medseg tests

clean:
	rm -rf $(VENV) runs mlruns mlartifacts mlflow.db .pytest_cache
