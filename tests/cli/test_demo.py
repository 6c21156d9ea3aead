"""`teleflm demo` end to end on a tiny budget, its artefacts checked; a re-run reuses them; bad --out
values are refused up front."""

import json
import math
import os
import re
import subprocess
import sys
import time
from collections import namedtuple

import pytest

from teleflm.cli.main import main

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def demo(out, minutes="1"):
    return subprocess.run(
        [sys.executable, "-m", "teleflm.cli.main", "demo", "--minutes", minutes, "--out", str(out)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    run = demo(out)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in [
        "report.md",
        "report.json",
        "bpb.png",
        "loss.png",
        "run/metrics.jsonl",
        "run/export/config.json",
    ]:
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    metrics = [json.loads(line) for line in (out / "run/metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss" in m]
    assert report["result"]["loss"] == train[-1]["loss"] and report["result"]["step"] == train[-1]["step"]
    assert train[-1]["loss"] < train[0]["loss"]  # it learned something
    assert set(report["bpb"]) == {"book_en", "poetry_zh", "code"}
    for domain, row in report["bpb"].items():
        assert all(math.isfinite(row[k]) and 0 < row[k] < 16 for k in ("model", "xz -9", "gzip -9")), domain
        assert row["model"] == pytest.approx(report["result"][f"val.{domain}.bpb"])
        assert f"| {domain} | {row['model']:.3f} |" in (out / "report.md").read_text()
    assert set(report["samples"]) == {"English", "Chinese", "code"}
    assert report["cache_mismatch"] == []
    assert "same tokens as decoding without it on every prompt (3 of 3)" in (out / "report.md").read_text()

    # The export loads in a fresh process with plain transformers and generates.
    script = (
        "import sys, torch\n"
        "from transformers import AutoTokenizer, AutoModelForCausalLM\n"
        "p = sys.argv[1]\n"
        "tok = AutoTokenizer.from_pretrained(p, trust_remote_code=True)\n"
        "model = AutoModelForCausalLM.from_pretrained(p, trust_remote_code=True)\n"
        "ids = tok('And God said', return_tensors='pt')\n"
        "out = model.generate(**ids, max_new_tokens=8, do_sample=False)\n"
        "assert out.shape[1] == ids['input_ids'].shape[1] + 8\n"
        "assert 'teleflm' not in sys.modules\n"
        "print('ok')\n"
    )
    fresh = subprocess.run(
        [sys.executable, "-c", script, str(out / "run/export")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=ENV,
    )
    assert fresh.stdout.strip().endswith("ok"), fresh.stderr[-2000:]

    # A re-run reuses every stage and trains no further.
    again = demo(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "up to date, skipped" in again.stdout
    assert json.loads((out / "report.json").read_text())["result"]["step"] == report["result"]["step"]


def test_out_pointing_at_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["demo", "--out", str(target)]) == 2
    assert re.search(r"--out .*file is a file, not a folder", capsys.readouterr().err)


def test_unwritable_out_is_refused(capsys):
    assert main(["demo", "--out", "/proc/teleflm-demo"]) == 2
    assert "cannot write in /proc" in capsys.readouterr().err


def test_too_small_disk_is_refused(tmp_path, capsys, monkeypatch):
    import shutil

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))
    assert main(["demo", "--out", str(tmp_path / "d")]) == 2
    assert "1 MiB free on its disk, the demo needs about" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "compiled_step, left, raises, chosen",
    [
        (0.3, 600, False, True),  # faster: compiled
        (0.6, 600, False, False),  # slower: eager
        (0.3, 600, True, False),  # compiling failed: eager, and why is printed
        (0.3, 100, False, False),  # too little time left to measure it: not tried
    ],
)
def test_the_demo_compiles_only_where_it_measures_faster(
    monkeypatch, capsys, tmp_path, compiled_step, left, raises, chosen
):
    from types import SimpleNamespace

    import teleflm.cli.demo as demo_cli

    def calibrate(cfg, out):
        assert cfg.parallel.compile  # the eager times are the caller's
        if raises:
            raise RuntimeError("InductorError: no C++ compiler")
        return {"step": compiled_step, "evaluation": 1.0, "checkpoint": 0.2}

    monkeypatch.setattr(demo_cli, "calibrate", calibrate)
    eager = {"step": 0.5, "evaluation": 1.0, "checkpoint": 0.2}
    cfg = SimpleNamespace(parallel=SimpleNamespace(compile=False))  # all that the choice touches
    compile_it, times = demo_cli.choose_compile(cfg, tmp_path, eager, finish_by=time.time() + left)
    assert compile_it is chosen and times["step"] == (compiled_step if chosen else 0.5)
    assert not cfg.parallel.compile  # the caller's config is left as it was
    printed = capsys.readouterr().out
    assert ("no C++ compiler" in printed and "training eagerly" in printed) == raises
