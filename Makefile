# Loracle. On a fresh machine `make demo` and `make test` work with nothing done before.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build by default; GPU users: make install TORCH_SPEC='torch==2.13.0 --index-url ...'
# or install their CUDA torch into .venv first (an installed torch satisfies this pin's range).
TORCH_SPEC ?= torch==2.13.0
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
STAMP := $(VENV)/.installed
# The Node.js client of the polyglot check (tests/e2e/test_node_client.py), from its lockfile.
NODE_INTEROP := interop/node
NODE_STAMP := $(NODE_INTEROP)/node_modules/.installed
export LORACLE_TEST_POSTGRES_URL ?= postgresql://postgres@127.0.0.1:5432/test

.PHONY: install demo test proto check-generated lint-proto lint format typecheck pytest \
        services bench bench-reliability eval-recommend serve clean cluster bench-cluster

install: $(STAMP) $(BUF) $(NODE_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e '.[dev]'
	touch $@

$(BUF):
	npm install --prefix .tools --no-audit --no-fund --loglevel=error @bufbuild/buf@$(BUF_VERSION)

$(NODE_STAMP): $(NODE_INTEROP)/package.json $(NODE_INTEROP)/package-lock.json
	npm ci --prefix $(NODE_INTEROP) --no-audit --no-fund --loglevel=error
	touch $@

demo: install
	$(BIN)/python -m server.devtools.demo

test: check-generated lint-proto lint typecheck pytest

proto: install
	scripts/gen_protos.sh

check-generated: install
	scripts/check_generated.sh

lint-proto: install
	$(BUF) lint

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy server client tests bench

services:
	scripts/ensure_services.sh

pytest: install services
	$(BIN)/pytest -q tests

# Two API replicas and two workers on loopback, with PostgreSQL and NATS JetStream (started
# if not running); Ctrl-C stops them. See docs/deploy.md.
cluster: install services
	$(BIN)/python -m server.devtools.cluster

bench: install
	$(BIN)/python bench/bench_catalog.py
	$(BIN)/python bench/generation_cpu.py
	$(BIN)/python bench/mixed_loras_cpu.py

# One worker against two and the broker path's cost per job (needs PostgreSQL and nats-server,
# so not part of `make bench`); QUICK=1 for a 2-minute run.
bench-cluster: install services
	$(BIN)/python bench/cluster.py $(if $(QUICK),--quick)

# The reliability suite with heavy settings (CI runs it light, as part of `make test`).
bench-reliability: install services
	LORACLE_FUZZ_EXAMPLES=$(or $(FUZZ_EXAMPLES),400) LORACLE_CRASH_ROUNDS=$(or $(CRASH_ROUNDS),10) \
	LORACLE_LOAD_SECONDS=$(or $(LOAD_SECONDS),60) LORACLE_LOAD_QUERIES=$(or $(LOAD_QUERIES),500) \
	LORACLE_SOAK_ROUNDS=$(or $(SOAK_ROUNDS),20) \
	$(BIN)/pytest -q -s -p no:cacheprovider --timeout 1800 tests/reliability

# make eval-recommend CATALOG=... QUERIES=... [HISTORY=...] [LIMIT=N]
CATALOG ?= ../shared/eval/civitai_loras.jsonl
QUERIES ?= ../shared/eval/dev_queries.jsonl
eval-recommend: install
	$(BIN)/python bench/eval_recommend.py --catalog $(CATALOG) --queries $(QUERIES) \
		$(if $(HISTORY),--history $(HISTORY)) $(if $(LIMIT),--limit $(LIMIT))

serve: install
	$(BIN)/loracle-server --data-dir ./data

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache demo-data
