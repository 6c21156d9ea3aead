#!/usr/bin/env bash
# The main job: sets up .venv, then runs `teleflm demo` (arguments pass through, e.g. --minutes 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/teleflm demo "$@"
