#!/usr/bin/env bash
# The model files that exports ship, under other transformers releases: for each release, a side
# environment (.compat/transformers-VERSION: that release and what it needs, over .venv's other
# packages) runs tests/compat/check_export.py on a fresh export, with teleflm unimportable: logits
# against transformers' own Llama, cached == uncached == Llama greedy decoding on a left-padded batch
# with repetition penalty 1.03, and the model card's quick start.
#   bash scripts/compat.sh                  the oldest release exports claim, and the newest on the registry
#   bash scripts/compat.sh 4.57.6 5.10.4    given releases ("newest" for the newest)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
oldest=$(.venv/bin/python -c 'from teleflm.model.io import OLDEST_TRANSFORMERS; print(OLDEST_TRANSFORMERS)')
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=("$oldest" newest)
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
OMP_NUM_THREADS=1 .venv/bin/python -m tests.compat.make_export "$work" > /dev/null
failed=0
for version in "${versions[@]}"; do
    env=.compat/transformers-$version
    if [ ! -x "$env/bin/python" ]; then
        python3 -m venv "$env"
        # .venv's packages come after the side environment's own: only what the release needs is installed.
        echo "$site" > "$env/lib/python3.11/site-packages/teleflm-venv.pth"
    fi
    if [ "$version" = newest ]; then spec=(--upgrade transformers); else spec=("transformers==$version"); fi
    "$env/bin/pip" install -q --disable-pip-version-check -c constraints.txt "${spec[@]}" 2>&1 |
        grep -v "dependency resolver\|which is incompatible\|is ignored" || true
    installed=$("$env/bin/python" -c 'import transformers; print(transformers.__version__)')
    echo "== transformers $installed ($version)"
    # A fresh HF_HOME: remote code is loaded from the export, never from a cache of an earlier one.
    if HF_HOME="$work/hf-$version" OMP_NUM_THREADS=1 "$env/bin/python" -m tests.compat.check_export "$work/export"; then
        echo "ok: transformers $installed"
    else
        echo "FAILED: transformers $installed"
        failed=1
    fi
done
exit $failed
