#!/usr/bin/env bash
# The test command: sets up .venv, lints, runs the whole suite (slow multi-rank tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q "$@"
