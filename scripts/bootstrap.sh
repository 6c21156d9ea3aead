#!/usr/bin/env bash
# Creates .venv with exactly the packages of requirements.lock (hash-checked, transitive ones included),
# then teleflm itself; a no-op when up to date. `bash scripts/lock.sh` refreshes the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.teleflm-installed
want=$(cat pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), "the lock is for Python 3.11"'
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/pip install -q --disable-pip-version-check)
"${pip[@]}" --require-hashes --no-deps -r requirements.lock
# The lock holds the build backend too, so the package builds from it, not from whatever the index has.
"${pip[@]}" --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
