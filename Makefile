# jifen — `make help` lists the targets. Each target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: help demo test lint bench clean

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable '.[test]'
	touch $@

demo: $(BIN)/.installed ## install, then run the demo programme on the embedded SQLite database
	$(BIN)/jifen demo

lint: $(BIN)/.installed ## ruff (lint and format) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint ## install, lint, then run every test on SQLite and PostgreSQL
	$(BIN)/pytest

bench: $(BIN)/.installed ## the ledger benchmark against PostgreSQL (see bench/README.md)
	$(BIN)/python bench/ledger.py

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
