# Two commands do everything on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup run test test-quick lint bench grpc

# torch first, pinned to the CPU build on this disk: a bare `pip install torch` (or the range in
# pyproject.toml with no torch installed yet) would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) -m app

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest

# The unit and app tiers only (no server processes, sockets or database servers): under a minute.
test-quick: setup
	$(VENV)/bin/pytest -m "unit or app"

# Regenerate the gRPC door's code from app/grpc/proto/*.proto (committed; tests/test_grpc.py
# fails when it is stale).
grpc: setup
	$(PY) scripts/generate_grpc.py

# Needs wrk (Debian: apt-get install -y wrk). About 25 minutes (gRPC rows, the cost of each
# feature, startup and a large upload included); writes bench/results.md.
bench: setup
	$(PY) bench/run.py --duration 10
