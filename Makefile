# Set-up and main entry points. `make demo` and `make test` create .venv and install UFO into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ufo-installed

.PHONY: demo test lint bench clean

demo: $(STAMP)
	$(BIN)/ufo demo

test: lint $(STAMP)
	$(BIN)/python -m pytest -q

# lint (ruff), formatting (ruff format) and types (mypy): part of `make test`
lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/core.py

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[all,test]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
