"""The planner: exact parameter counts, the published Tele-FLM / FLM-101B figures, what does not fit."""

from pathlib import Path

import pytest
import torch

from teleflm.cli.main import main
from teleflm.model import TeleFLMForCausalLM
from teleflm.parallel.plan import Layout, memory_per_device, parameter_counts, plan
from teleflm.train.config import load_config

CONFIGS = Path(__file__).parents[2] / "configs"
NO_DATA = ["data.shards=''", "data.tokenizer=''"]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_parameter_count_is_exact(path):
    cfg = load_config(path, NO_DATA)
    with torch.device("meta"):
        real = sum(p.numel() for p in TeleFLMForCausalLM(cfg.model_config()).parameters())
    assert parameter_counts(cfg.model_config())["total"] == real


def test_52b_on_896_a800_takes_about_two_months():
    cfg = load_config(CONFIGS / "teleflm-52b.toml", NO_DATA)
    r = plan(cfg, 896, "a800", tokens=2e12)
    assert r["layout"] == "TP 4 / PP 2 / DP 112"
    assert r["days"] == pytest.approx(60, rel=0.25)  # the report: ~2T tokens in about two months
    assert r["fits"]


def test_flm_101b_stage_layouts_fit_and_reach_160_tflops():
    cfg = load_config(CONFIGS / "flm-101b.toml", NO_DATA)
    c = cfg.model_config()
    for tp, pp, dp in [(4, 2, 24), (4, 4, 12)]:  # FLM-101B's 51B and 101B stage layouts on 192 GPUs
        r = plan(
            load_config(
                CONFIGS / "flm-101b.toml",
                [*NO_DATA, f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp_shard={dp}"],
            ),
            192,
            "a800",
        )
        assert r["fits"], (tp, pp)
        assert r["tflops_per_gpu"] == pytest.approx(160, rel=0.25)
    # Without activation checkpointing and no model parallelism, 101B does not fit in 80 GB.
    too_big = memory_per_device(c, Layout(dp_shard=192), 2048, 4, activation_checkpointing=False)
    assert too_big["total"] / 2**30 > 80


def test_plan_command(capsys):
    assert (
        main(
            [
                "plan",
                "--config",
                str(CONFIGS / "teleflm-52b.toml"),
                "--gpus",
                "896",
                "--gpu-type",
                "a800",
                "--tokens",
                "2e12",
                "--price-per-gpu-hour",
                "1.5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "52.824B" in out and "TP 4 / PP 2 / DP 112" in out and "days" in out and "cost" in out
    assert (
        main(["plan", "--config", str(CONFIGS / "teleflm-52b.toml"), "--gpus", "100", "--gpu-type", "a800"])
        == 2
    )
    assert "100 GPUs do not divide" in capsys.readouterr().err
