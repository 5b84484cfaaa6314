# Two commands on a fresh clone:  `make demo` (set up, then train on the packaged data)
# and `make test` (set up, then run the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-oldest lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(BIN)/cellvi demo --overwrite

test: setup
	$(BIN)/python -m pytest -q

# The suite at the oldest supported versions (.ci/oldest.txt), in its own environment; torch
# 2.4.1 comes from PyPI there (a CUDA build, about 3 GB), so this is not part of `make test`.
OLDEST_PYTHON ?= $(shell command -v python3.10 || echo $(PYTHON))
test-oldest:
	$(OLDEST_PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/pip install --quiet --upgrade pip
	.venv-oldest/bin/pip install --quiet -r .ci/oldest.txt
	.venv-oldest/bin/pip install --quiet --no-deps -e .
	.venv-oldest/bin/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .venv-oldest cellvi-demo .pytest_cache
