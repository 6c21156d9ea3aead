"""`teleflm plan --simulate`: the real layout code on a fake world of any size, on one CPU. The shards
it reports are those real ranks hold (gloo, 4 ranks), a 64-rank world with a growth takes seconds,
and the planner agrees with the simulated shards within 5%."""

from pathlib import Path

import pytest

from teleflm.config import build
from teleflm.plan.simulate import planner_gaps, shard_bytes, simulate, simulate_rank
from teleflm.testing import run_ranks, tiny_train_config
from teleflm.train.config import GrowthStage

CONFIGS = Path(__file__).parents[2] / "configs"


def layered_config(out: Path, **parallel):
    """A small muP model with a growth, laid out over TP x PP x FSDP."""
    model = dict(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        use_mup=True,
        mup_scale_factor=1.0,
    )
    cfg = tiny_train_config(
        out,
        model=model,
        data={"context_length": 128},
        batch={"global_batch_tokens": 128 * 64, "micro_batch_size": 1},
        schedule={"total_tokens": 128 * 64 * 20},
        parallel={"tp": 2, "pp": 2, "activation_checkpointing": True, **parallel},
    )
    growth = {
        "at_tokens": 128 * 64 * 5,
        "ramp_steps": 2,
        "model": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8),
        "parallel": {"tp": 4},
    }
    cfg.growth = [build(GrowthStage, growth, "growth")]
    return cfg


def test_a_64_rank_world_with_a_growth_agrees_with_the_planner(tmp_path):
    stages = simulate(layered_config(tmp_path), 64)
    assert [(s["stage"], s["layout"].tp, s["layout"].dp) for s in stages] == [(0, 2, 16), (1, 4, 8)]
    for s in stages:
        last = next(r for r in s["ranks"] if r.rank == 63)
        assert last.coords == {
            "pp": 1,
            "dp_replicate": 0,
            "dp_shard": s["layout"].dp - 1,
            "tp": s["layout"].tp - 1,
        }
        assert len(s["ranks"]) == 3  # first, a middle one, last
        gaps = planner_gaps(s["ranks"])
        assert set(gaps) == {"weights", "gradients", "optimizer"} and max(gaps.values()) <= 0.05, gaps
    growth = stages[1]["growth"][0]
    assert growth["grown_shards"] == pytest.approx(growth["planned_grown_shards"], rel=0.05)
    assert 0 < growth["old_parts"] <= growth["grown_shards"]


def real_and_simulated(out: str) -> tuple[int, int]:
    """On a real gloo rank: the bytes of its shards as training builds them, and the simulation's."""
    import torch.distributed as dist

    from teleflm.parallel.mesh import ParallelDims, build_mesh
    from teleflm.parallel.parallelize import build_module

    cfg = layered_config(Path(out), dp_shard=1)
    cfg.growth = []
    dims = ParallelDims(tp=2, pp=2)
    real = build_module(cfg.model_config(), build_mesh(dims, "cpu"), dims, cfg.parallel, "cpu")
    weights = sum(shard_bytes(p) for p in real.parameters())
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in real.parameters())
    rank = dist.get_rank()
    dist.destroy_process_group()  # the simulation makes this process that rank of a fake world
    simulated = simulate_rank(cfg, 4, rank)
    return weights, simulated.simulated["weights"], 8 * local, simulated.simulated["optimizer"]


def test_the_simulated_shards_are_those_real_ranks_hold(tmp_path):
    """TP 2 x PP 2 on 4 gloo ranks: each rank's shards as training builds them, byte for byte."""
    for weights, simulated, moments, simulated_moments in run_ranks(4, real_and_simulated, str(tmp_path)):
        assert simulated == weights and simulated_moments == moments


def test_plan_simulate_prints_every_stage(capsys):
    from teleflm.cli.main import main

    config = str(CONFIGS / "teleflm-52b.toml")
    assert main(["plan", "--simulate", "--config", config, "--gpus", "896", "--ranks", "0", "895"]) == 0
    out = capsys.readouterr().out
    assert "TP 4 / PP 2 / DP 112 on 896 fake ranks" in out and "planner vs the largest simulated shard" in out
    assert main(["plan", "--simulate", "--config", config, "--gpus", "896", "--ranks", "896"]) == 2
