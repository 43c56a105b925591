# make run: the whole local stack on a small built-in model. make test: the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format protos bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/pdmesh up $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check pdmesh services tests
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check pdmesh services tests
	$(BIN)/ruff format --check pdmesh services tests

format: $(STAMP)
	$(BIN)/ruff format pdmesh services tests
	$(BIN)/ruff check --fix pdmesh services tests

protos: $(STAMP)
	$(BIN)/python -m pdmesh.rpc.codegen

clean:
	rm -rf $(VENV) .pdmesh
