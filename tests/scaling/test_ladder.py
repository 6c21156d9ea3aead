"""`teleflm predict`: a tiny trained ladder (sanity only), finished rungs read back, bad ladders refused."""

import json
import tomllib

import numpy as np
import pytest

from teleflm.cli.main import main
from teleflm.tune.runs import to_toml
from tests.train.common import pattern_sequences
from tests.tune.test_search import proxy_config


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
    args = write_ladder(tmp_path, widths=[16, 24, 32, 48])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "predicted held-out loss (nats per token)" in out and "residual-bootstrap interval" in out
    assert "self-check on the largest rung" in out
    rungs = [json.loads((tmp_path / "ladder" / f"w{w}" / "rung.json").read_text()) for w in (16, 24, 32, 48)]
    assert all(np.isfinite(r["loss"]) and 0 < r["loss"] < np.log(96) for r in rungs)
    assert [r["params"] for r in rungs] == sorted(r["params"] for r in rungs)
    report = (tmp_path / "ladder" / "predict.md").read_text()
    assert "Self-check" in report and (tmp_path / "ladder" / "predict.png").exists()
    # A second run reads every finished rung instead of training it again.
    assert main(args) == 0
    assert capsys.readouterr().out.count("read ") == 4


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
