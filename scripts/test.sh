#!/usr/bin/env bash
# The test command: sets up .venv from the lock, lints, runs the whole suite (slow multi-rank tests
# included), then checks the exported model files under the oldest transformers they claim and the
# newest on the registry (scripts/compat.sh), so a rename in a new release turns this red first. The
# suite runs on one pytest-xdist worker per core (at most 4), each test file on one worker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile "$@"
bash scripts/compat.sh
