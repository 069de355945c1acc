# `make run`: set up .venv and start the gRPC service and the HTTP API on localhost.
# `make test`: set up .venv (and the Node.js test tools) and run every check CI runs.
PY := .venv/bin/python
MODEL ?= openai/whisper-large-v3

.PHONY: run test pytest proto proto-check bench

.venv/installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

node_modules/installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

run: .venv/installed
	MODEL=$(MODEL) scripts/run.sh

test: .venv/installed node_modules/installed proto-check pytest

pytest: .venv/installed
	$(PY) -m pytest -q

bench: .venv/installed
	$(PY) bench/engine.py --size base --windows 8 --batch 8 --tokens 64
