# The two commands: `make run` (the stack on the embedded default) and `make test`.
# Both create the virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run demo test lint bench bench-short

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/tokenwarden run

demo: $(STAMP)
	$(BIN)/tokenwarden demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest

# Benchmarks (bench/*.py; helper modules start with "_"): each prints a table and, last, one JSON
# line; `make bench` exits non-zero when a target is missed, `make bench-short` only when a
# script cannot run (tiny sizes, one run: what CI runs so the scripts cannot rot).
# Pass options through BENCH_ARGS, e.g. BENCH_ARGS='--broker-url redis://127.0.0.1:6379/0'.
BENCH_SCRIPTS := $(sort $(filter-out bench/common.py bench/_%.py,$(wildcard bench/*.py)))
BENCH_ARGS ?=

bench: $(STAMP)
	@status=0; for script in $(BENCH_SCRIPTS); do \
	  echo "== $$script"; $(BIN)/python $$script $(BENCH_ARGS) || status=1; \
	done; exit $$status

bench-short: $(STAMP)
	@status=0; for script in $(BENCH_SCRIPTS); do \
	  echo "== $$script --short"; $(BIN)/python $$script --short $(BENCH_ARGS) || status=1; \
	done; exit $$status
