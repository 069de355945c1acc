# `make run`: set up .venv and start the gRPC service and the HTTP API on localhost.
# `make test`: set up .venv (and the Node.js test tools) and run every check CI runs.
PY := .venv/bin/python
BUF := node_modules/.bin/buf
# MODEL empty: scripts/run.sh's default (DRAGOMAN_MODEL, else openai/whisper-large-v3).
MODEL ?=

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

# Regenerate the Python stubs of the gRPC contract (dragoman/v1/) from proto/.
proto: .venv/installed
	scripts/gen_proto.sh

# The contract is linted and formatted, has no breaking change since the previous commit
# (skipped when that commit has no contract, or in a shallow clone), and its committed stubs
# are what the generator writes.
proto-check: .venv/installed node_modules/installed
	$(BUF) lint
	$(BUF) format --diff --exit-code
	@if git rev-parse -q --verify 'HEAD~1^{commit}' >/dev/null && git cat-file -e 'HEAD~1:buf.yaml' 2>/dev/null; then \
		echo "$(BUF) breaking --against '.git#ref=HEAD~1'"; \
		$(BUF) breaking --against '.git#ref=HEAD~1'; \
	else \
		echo "buf breaking: skipped, no previous commit with a buf module"; \
	fi
	PY=$(PY) scripts/gen_proto.sh
	@git diff --exit-code --stat -- dragoman/ && test -z "$$(git ls-files --others --exclude-standard -- dragoman/)" \
		|| { echo "error: the stubs in dragoman/ differ from proto/: run 'make proto' and commit them" >&2; exit 1; }

# Engine throughput on a random-weight Whisper; add PEERS=path/to/peers.py for the peer table.
bench: .venv/installed
	$(PY) bench/engine.py --model-dir /tmp/dragoman-bench/hf --size base --windows 8 --batch 8 --tokens 64 \
		$(if $(PEERS),--peers-script $(PEERS))
