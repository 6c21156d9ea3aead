#!/usr/bin/env bash
# Creates .venv and installs teleflm with torch pinned by constraints.txt; a no-op when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.teleflm-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
python3 -c 'import sys; assert sys.version_info >= (3, 11), "teleflm needs Python >= 3.11"'
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
echo "$want" > "$stamp"
