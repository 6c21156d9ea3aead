#!/usr/bin/env bash
# Refreshes requirements.lock: every package of the environment (transitive ones, the build backend,
# every extra) at an exact version with hashes, resolved from pyproject.toml's ranges under
# constraints.txt (torch pinned to the CPU wheel). Commit the result with the change that needed it;
# tests/test_lock.py fails while the lock and pyproject.toml disagree. Pins already in the lock are kept
# where they still satisfy pyproject.toml; `bash scripts/lock.sh --upgrade` moves every package to its newest.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools"
"$tools/bin/pip" install -q --disable-pip-version-check pip-tools==7.6.2
"$tools/bin/pip-compile" --quiet --all-extras --all-build-deps --allow-unsafe --strip-extras \
    --generate-hashes --no-emit-index-url --no-emit-find-links -c constraints.txt \
    -o requirements.lock "$@" pyproject.toml
