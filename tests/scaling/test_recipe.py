"""`teleflm recipe` at a tiny size: every stage runs, the report sets the forecast beside the
trained target's loss, a second call trains nothing, a bad recipe is refused."""

import json

import pytest

from teleflm.cli.main import main

TINY = """
head_dim = 8
[data]
chars = 300_000
vocab_size = 320
context_length = 32
[proxy]
hidden_size = 16
intermediate_size = 40
num_hidden_layers = 1
[train]
mup = { std = 0.02, matrix_std = 0.02 }
batch = { global_batch_tokens = 256, micro_batch_size = 8 }
schedule = { total_tokens = 25_600, warmup_steps = 10 }
parallel = { mixed_precision = "fp32" }
stability = { action = "stop", min_loss_jump = 100.0, min_grad_ratio = 1e6 }
[search]
method = "grid"
params = { lr = { values = [4e-3, 8e-3] } }
derived = { matrix_lr = "lr", min_lr = "0.1 * lr" }
[target]
hidden_size = 64
num_hidden_layers = 2
[ladder]
widths = [16, 24, 32, 40, 48]
seeds = 2
"""


@pytest.mark.slow
def test_tiny_recipe_forecasts_its_target(tmp_path, capsys):
    """Proxy width 16 x 1 layer -> target 64 x 2 (4x wider, 2x deeper); 5 widths x 2 seeds; 100
    steps each. Measured here: forecast 3.5132, target 3.5044 (+0.25%), inside its interval."""
    (tmp_path / "tiny.toml").write_text(TINY)
    args = ["recipe", "--config", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    out = tmp_path / "out"
    figures = json.loads((out / "recipe.json").read_text())
    assert figures["trials"] == 2 and figures["target_width"] == 64 and figures["target_depth"] == 2
    target = (out / "target.toml").read_text()
    assert "mup_scale_factor = 4.0" in target and "mup_depth_factor = 2.0" in target
    assert abs(figures["error"]) <= 0.02
    assert figures["error"] == pytest.approx(figures["forecast"] / figures["measured"] - 1)
    assert len(figures["held_out_errors"]) == 2 and figures["cost_share"] > 0
    report = (out / "report.md").read_text()
    assert f"**{figures['forecast']:.4f}**" in report and f"**{figures['measured']:.4f}**" in report
    for png in ("recipe.png", "ladder/predict.png", "search/search.png", "target.png"):
        assert (out / png).stat().st_size > 5_000, png
    capsys.readouterr()
    assert main(args) == 0  # a second call reads every finished stage back
    log = capsys.readouterr().out
    assert "2 trials finished so far" in log and log.count(": read ") == 10 and "training" not in log
    assert json.loads((out / "recipe.json").read_text())["measured"] == figures["measured"]


def test_a_target_no_wider_than_the_proxy_is_refused(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text(TINY.replace("hidden_size = 64", "hidden_size = 16"))
    assert main(["recipe", "--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "out")]) == 2
    assert "wider than the proxy" in capsys.readouterr().err and not (tmp_path / "out").exists()
