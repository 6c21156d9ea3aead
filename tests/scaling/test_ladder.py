"""`teleflm predict`: a tiny trained ladder (sanity only: seeds, held-out rungs, cost), finished runs
read back, bad ladders refused."""

import json
import re
import tomllib

import numpy as np
import pytest

from teleflm.cli.main import main
from teleflm.model import TeleFLMConfig
from teleflm.model.size import flops_per_token
from teleflm.scaling.ladder import load_ladder, rung_config
from teleflm.testing import CONTEXT, pattern_sequences
from teleflm.tune.runs import to_toml
from tests.tune.common import proxy_config


def write_ladder(tmp_path, **keys):
    base = proxy_config(tmp_path)
    base["model"].update(hidden_size=16, intermediate_size=32, num_attention_heads=2)
    base["mup"].update(lr=3e-2, matrix_lr=3e-2, min_lr=3e-3)
    (tmp_path / "base.toml").write_text(to_toml(base))
    target = proxy_config(tmp_path)
    target["model"].update(hidden_size=256, intermediate_size=512, num_attention_heads=32)
    (tmp_path / "target.toml").write_text(to_toml(target))
    np.save(tmp_path / "seqs.npy", pattern_sequences(64))
    ladder = {"config": "base.toml", "out": "ladder", "sequences": "seqs.npy", "head_dim": 8, **keys}
    (tmp_path / "ladder.toml").write_text(to_toml(ladder))
    return ["predict", "--ladder", str(tmp_path / "ladder.toml"), "--target", str(tmp_path / "target.toml")]


def test_trained_ladder_predicts_and_reads_finished_rungs(tmp_path, capsys):
    """5 widths x 2 seeds (the seeds differ: init and data order), the 2 largest held out, the
    ladder's cost beside the target's; a second call trains nothing."""
    widths = [16, 24, 32, 48, 64]
    args = write_ladder(tmp_path, widths=widths, seeds=2)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "predicted held-out loss (nats per token)" in out and "90% interval for one run" in out
    assert out.count("held-out rung N = ") == 2
    runs = {
        (w, s): json.loads((tmp_path / "ladder" / f"w{w}" / f"s{s}" / "rung.json").read_text())
        for w in widths
        for s in (0, 1)
    }
    assert all(np.isfinite(r["loss"]) and 0 < r["loss"] < np.log(96) for r in runs.values())
    assert all(runs[w, 0]["loss"] != runs[w, 1]["loss"] for w in widths)
    params = [runs[w, 0]["params"] for w in widths]
    assert params == sorted(params)
    # Cost: every rung's two seeds over the target's one run, both 6 steps of 4 x 32 tokens; the
    # width-256 target's FLOPs per token dwarf the rungs'.
    share = float(re.search(r"([0-9.]+)% of the target run's", out).group(1)) / 100
    per_token = [
        flops_per_token(TeleFLMConfig(**rung_config(load_ladder(args[2]), w)["model"]), CONTEXT)
        for w in widths
    ]
    target = tomllib.loads((tmp_path / "target.toml").read_text())
    assert share == pytest.approx(
        2 * sum(per_token) / flops_per_token(TeleFLMConfig(**target["model"]), CONTEXT), rel=1e-3
    )
    report = (tmp_path / "ladder" / "predict.md").read_text()
    assert (
        report.count("error ") == 2
        and "Ladder cost" in report
        and (tmp_path / "ladder" / "predict.png").exists()
    )
    # A second run reads every finished run instead of training it again.
    assert main(args) == 0
    assert capsys.readouterr().out.count("read ") == 10


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"widths": [16, 32]}, "give at least 3 rungs"),
        ({"widths": [16, 48, 32]}, "widths must strictly increase"),
        (
            {
                "points": [
                    {"params": 3e4, "loss": 3.0},
                    {"params": 1e4, "loss": 3.2},
                    {"params": 5e4, "loss": 2.9},
                ]
            },
            "strictly increasing params",
        ),
    ],
)
def test_bad_ladders_refused_with_a_message(tmp_path, capsys, keys, message, monkeypatch):
    import teleflm.scaling.ladder as ladder

    # Rungs of a refused ladder are never trained: a stand-in that would be caught.
    monkeypatch.setattr(ladder, "scored_run", lambda *a, **k: {"status": "ok", "objective": 3.0, "step": 1})
    args = write_ladder(tmp_path, **keys)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_target_must_be_larger_than_the_ladder(tmp_path, capsys):
    points = [{"params": n, "loss": 60 * n**-0.3 + 2} for n in (1e6, 1e7, 1e8, 1e9)]
    args = write_ladder(tmp_path, points=points)
    assert main(args) == 2
    assert "not more than the largest rung" in capsys.readouterr().err
    assert tomllib.loads((tmp_path / "ladder.toml").read_text())["points"][0]["params"] == 1e6


def test_points_with_a_loss_per_seed(tmp_path, capsys):
    """Runs done elsewhere, a loss per seed: the interval and the held-out check come from them."""
    rng = np.random.default_rng(0)
    points = [
        {"params": n, "loss": [float(x) for x in (60 * n**-0.3 + 2) * (1 + 0.003 * rng.standard_normal(3))]}
        for n in (1e3, 3e3, 1e4, 3e4, 1e5)
    ]
    args = write_ladder(tmp_path, points=points)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "90% interval for one run" in out and out.count("held-out rung N = ") == 2
    assert "Ladder cost" not in out  # the points' cost is not known
