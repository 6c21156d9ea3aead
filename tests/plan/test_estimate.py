"""The planner: exact parameter counts, the published Tele-FLM / FLM-101B figures, what does not fit."""

from pathlib import Path

import pytest
import torch

from teleflm.cli.main import main
from teleflm.model import TeleFLMForCausalLM
from teleflm.model.size import flops_per_token, parameter_counts
from teleflm.parallel.mesh import ParallelDims
from teleflm.plan.estimate import memory_per_device, plan
from teleflm.train.config import load_config

CONFIGS = Path(__file__).parents[2] / "configs"
NO_DATA = ["data.shards=''", "data.tokenizer=''"]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_parameter_count_is_exact(path):
    cfg = load_config(path, NO_DATA)
    with torch.device("meta"):
        real = sum(p.numel() for p in TeleFLMForCausalLM(cfg.model_config()).parameters())
    assert parameter_counts(cfg.model_config())["total"] == real


def test_flops_per_token_are_the_flops_a_step_runs():
    """The planner's FLOPs per token against the matrix products a training step actually runs,
    counted by torch's FLOP counter (SDPA on its math path so attention's products count too); the
    norms' 6 x weights are the whole difference."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from teleflm.testing import tiny_config

    config = tiny_config(vocab_size=128, max_position_embeddings=64)
    model = TeleFLMForCausalLM(config)
    tokens = torch.randint(0, 128, (2, 65), generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(input_ids=tokens[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    counted = counter.get_total_flops() / tokens[:, :-1].numel()
    assert flops_per_token(config, 64) == pytest.approx(counted, rel=0.005)


def test_52b_on_896_a800_fits_and_the_reports_two_months_mean_a_plausible_utilisation():
    """Not the planner's assumed MFU multiplied back: the FLOPs it counts for ~2T tokens, over the
    report's ~two months on 896 A800s, must imply a utilisation like FLM-101B's published 51-53%."""
    cfg = load_config(CONFIGS / "teleflm-52b.toml", NO_DATA)
    r = plan(cfg, 896, "a800", tokens=2e12)
    assert r["layout"] == "TP 4 / PP 2 / DP 112" and r["fits"]
    implied = r["flops"] / (896 * 312e12 * 60 * 86400)
    assert 0.35 <= implied <= 0.65, implied


GROWTH_CONFIG = CONFIGS / "grow" / "flm-101b-growth.toml"


@pytest.mark.parametrize(
    "stage, layout, billions",
    [(0, "TP 2 / PP 1 / DP 96", 14), (1, "TP 4 / PP 2 / DP 24", 50), (2, "TP 4 / PP 4 / DP 12", 103)],
)
def test_each_flm_101b_stage_fits_its_published_layout(stage, layout, billions):
    """Each stage of the growth schedule at its own shape (the 51B stage is the 51B model, not the
    101B one) and its published layout on 192 A800s."""
    from teleflm.train.config import stage_config

    cfg = stage_config(load_config(GROWTH_CONFIG, NO_DATA), stage)
    r = plan(cfg, 192, "a800")
    assert r["layout"] == layout and r["fits"], r["memory_gib"]
    assert r["parameters"]["total"] / 1e9 == pytest.approx(billions, rel=0.05)


def test_101b_without_model_parallel_does_not_fit():
    c = load_config(CONFIGS / "flm-101b.toml", NO_DATA).model_config()
    too_big = memory_per_device(c, ParallelDims(dp_shard=192), 2048, 4, activation_checkpointing=False)
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
