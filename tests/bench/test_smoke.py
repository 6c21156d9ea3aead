"""Every benchmark runs at its smallest size (`python -m bench --smoke`); the figures are not checked
here, only that each benchmark finishes and prints its table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import BENCHMARKS, SMOKE_ARGS

REPO = Path(__file__).parents[2]


def test_every_benchmark_has_smoke_arguments():
    assert set(SMOKE_ARGS) == set(BENCHMARKS)


@pytest.mark.slow
def test_every_benchmark_runs_at_its_smallest_size(tmp_path):
    summary = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--json", str(summary)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(summary.read_text())["benchmarks"]
    assert {name: r["exit"] for name, r in results.items()} == dict.fromkeys(BENCHMARKS, 0)
    for name in BENCHMARKS:
        assert f"=== {name}" in run.stdout
