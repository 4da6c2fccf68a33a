# tuneloop — `make run` serves http://127.0.0.1:8000, `make test` runs the suite.
# Both set everything up first (scripts/setup.sh; fast when already done).
# Settings come from TUNELOOP_* environment variables (TUNELOOP_HOST,
# TUNELOOP_PORT, TUNELOOP_DATA_DIR, ...), e.g. `TUNELOOP_PORT=9000 make run`.

SHELL := /bin/bash
VENV ?= .venv
PYTEST_ARGS ?=
export VENV

.PHONY: help run setup setup-test test lint clean

help:
	@echo "make run     set up, then serve http://$${TUNELOOP_HOST:-127.0.0.1}:$${TUNELOOP_PORT:-8000}"
	@echo "make test    set up (with chromium), then pytest \$$PYTEST_ARGS"
	@echo "make setup   virtual environment, vLLM build for this machine, model under models/"
	@echo "make lint    ruff"
	@echo "make clean   remove $(VENV) and models/ (data/ is kept)"

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

run: setup
	$(VENV)/bin/tuneloop serve

test: setup-test
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) models .pytest_cache .ruff_cache
