# spendkeeper developer entry points. `make serve` and `make test` work on a
# fresh machine: the first one builds .venv from PyPI.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Touched after a successful install; older than pyproject.toml => reinstall.
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: help .venv serve test lint typecheck promtool proto bench soak clean distclean

help: ## List the targets
	@grep -E '^[a-z.]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

.venv: $(STAMP) ## Create .venv and install spendkeeper (editable) with the dev tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

serve: $(STAMP) ## Serve the example policy on 127.0.0.1 (extra flags: ARGS=...)
	$(BIN)/spendkeeper serve $(ARGS)

test: promtool lint typecheck ## Lint, type-check and run the tests (soak tests excluded)
	$(BIN)/pytest -q $(ARGS)

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .

typecheck: $(STAMP) ## mypy --strict on policy/ and sidecar/
	$(BIN)/mypy

# promtool validates the alert rules in examples/ (a test calls it).
promtool:
	@if command -v promtool >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing promtool (Debian package prometheus)"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else \
		echo "promtool not found: install it (Debian/Ubuntu: sudo apt-get install prometheus;" \
		     "or a release binary from prometheus.io)" >&2; \
	fi

proto: $(STAMP) ## Regenerate sidecar/api/v1 from proto/ (commit the result)
	PYTHON=$(BIN)/python scripts/gen_proto.sh

bench: $(STAMP) ## Run the benchmarks in bench/
	$(BIN)/python -m bench $(ARGS)

soak: $(STAMP) ## Run only the long soak tests
	$(BIN)/pytest -q -m soak $(ARGS)

clean: ## Remove build outputs and tool caches (keeps .venv and data/)
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean ## Also remove .venv
	rm -rf $(VENV)
