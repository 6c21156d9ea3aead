"""`teleflm grow --from CKPT --to CONFIG`: a one-off growth the trainer resumes from; bad input is
refused with a clear error before anything is written or changed."""

import hashlib
from pathlib import Path

import pytest

from teleflm.cli.main import main
from teleflm.data.synthetic import ArrayStream
from teleflm.grow.plan import GrowthError, make_plan
from teleflm.testing import TINY_MODEL as TINY
from teleflm.testing import logged_losses, pattern_sequences, tiny_train_config
from teleflm.train.config import load_config
from teleflm.train.trainer import Trainer
from tests.grow.common import small_config

STEPS = 6
SECTIONS = dict(
    schedule={"total_tokens": 8 * 32 * STEPS},
    checkpoint={"interval_steps": 2, "keep_last": 10},
)


def toml_text(out: Path, model: dict) -> str:
    """The tiny test config as a TOML file, with another [model]."""
    cfg = tiny_train_config(out, **SECTIONS)
    lines = [f'out = "{out}"']
    for section in ("model", "data", "batch", "schedule", "mup", "parallel", "checkpoint", "logging"):
        table = model if section == "model" else vars(getattr(cfg, section))
        lines.append(f"[{section}]")
        for key, value in table.items():
            if isinstance(value, list):
                continue
            text = (
                f'"{value}"'
                if isinstance(value, str)
                else str(value).lower()
                if isinstance(value, bool)
                else value
            )
            lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def train(cfg) -> None:
    sequences = pattern_sequences()
    Trainer(cfg, stream_factory=lambda r, n: ArrayStream(sequences, r, n)).run()


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("source")
    train(tiny_train_config(out, **SECTIONS))
    return out


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_cli_grow_then_pretrain_resumes_with_the_same_loss(source_run, tmp_path):
    grown_out = tmp_path / "grown"
    config = tmp_path / "grown.toml"
    target = {
        **TINY,
        "hidden_size": 128,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "num_hidden_layers": 3,
    }
    target["mup_scale_factor"] = 4.0
    config.write_text(toml_text(grown_out, target))
    source = source_run / "checkpoints" / "step-00000002"
    assert main(["grow", "--from", str(source), "--to", str(config), "--ramp-steps", "3"]) == 0
    assert (grown_out / "checkpoints" / "step-00000002-grown" / "trainer.json").is_file()
    train(load_config(config))  # resumes from the grown checkpoint
    grown, plain = logged_losses(grown_out), logged_losses(source_run)
    assert sorted(grown) == list(range(3, STEPS + 1))
    assert grown[3] == pytest.approx(plain[3], abs=1e-5)  # the first step after growth
    assert grown[STEPS] < plain[1] - 0.1


@pytest.mark.parametrize(
    "change, args, message",
    [
        (
            {"hidden_size": 32, "num_attention_heads": 2, "mup_scale_factor": 1.0},
            [],
            "hidden_size .32. is smaller",
        ),
        ({"intermediate_size": 64}, [], r"intermediate_size \(64\) is smaller"),
        ({"num_hidden_layers": 3}, ["--layers-at", "3"], r"out of range 0..2"),
        ({"num_hidden_layers": 3}, ["--layers-at", "1", "2"], "names 2 positions"),
        (
            {"hidden_size": 128, "num_attention_heads": 8, "num_key_value_heads": 8, "mup_scale_factor": 4.0},
            [],
            "fewer than",
        ),
        ({"vocab_size": 128}, [], "also changes .'vocab_size'."),
    ],
)
def test_bad_growth_is_refused_before_any_change(change, args, message, source_run, tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(toml_text(tmp_path / "bad", {**TINY, **change}))
    source = source_run / "checkpoints" / "step-00000002"
    before = fingerprint(source)
    assert main(["grow", "--from", str(source), "--to", str(config), *args]) == 2
    assert capsys.readouterr().err.count("teleflm grow: error:") == 1
    with pytest.raises(GrowthError, match=message):
        from teleflm.train.growth import plan_for_checkpoint

        plan_for_checkpoint(source, load_config(config).model, [int(a) for a in args[1:]] or None)
    assert fingerprint(source) == before
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "target, message",
    [
        (dict(num_key_value_heads=1), r"num_key_value_heads \(1\) is smaller"),
        (dict(num_hidden_layers=1), r"num_hidden_layers \(1\) is smaller"),
        (
            dict(hidden_size=128, num_attention_heads=6),
            r"num_attention_heads \(6\) does not divide hidden_size",
        ),
        (dict(hidden_size=128), "head_dim .* differs"),
        (dict(hidden_size=128, num_attention_heads=8, mup_scale_factor=3.0), "disagrees with the width"),
        (dict(), "nothing to grow"),
    ],
)
def test_plan_errors_name_the_problem(target, message):
    with pytest.raises(GrowthError, match=message):
        make_plan(small_config(), target)


def test_growing_mid_ramp_is_refused(tmp_path):
    from teleflm.train.growth import plan_for_checkpoint

    ckpt = tmp_path / "step-00000005"
    ckpt.mkdir()
    (ckpt / ".metadata").write_text("")
    (ckpt / "trainer.json").write_text(
        '{"step": 5, "model_config": {}, "growth_masks": {"start_step": 3, "ramp_steps": 4, "plan": {}}}'
    )
    with pytest.raises(GrowthError, match="middle of a growth ramp"):
        plan_for_checkpoint(ckpt, {"hidden_size": 8192})
