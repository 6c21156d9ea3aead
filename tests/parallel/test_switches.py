"""Activation checkpointing, torch.compile and bf16 change how a step runs, not what it learns."""

import pytest

from teleflm.data.synthetic import ArrayStream
from teleflm.testing import logged_losses, pattern_sequences, run_ranks, tiny_train_config
from teleflm.train.trainer import Trainer

STEPS = 4


def losses(out, **parallel) -> list[float]:
    cfg = tiny_train_config(out, parallel=parallel, schedule={"total_tokens": 8 * 32 * STEPS})
    sequences = pattern_sequences()
    Trainer(cfg, stream_factory=lambda r, n: ArrayStream(sequences, r, n)).run()
    found = logged_losses(out)
    return [found[s] for s in range(1, STEPS + 1)]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return losses(tmp_path_factory.mktemp("fp32"))


def test_activation_checkpointing_is_exact(fp32, tmp_path):
    assert losses(tmp_path, activation_checkpointing=True) == fp32


def test_bf16_tracks_fp32(fp32, tmp_path):
    bf16 = losses(tmp_path, mixed_precision="bf16")
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    assert bf16 != fp32  # autocast really ran in bf16


@pytest.mark.slow
def test_compile_matches_eager(fp32, tmp_path):
    assert losses(tmp_path, compile=True, activation_checkpointing=True) == pytest.approx(fp32, rel=1e-4)


def pipeline_stage_dtypes(out, mixed_precision) -> tuple[list[float], set[str]]:
    """(losses, dtypes of every Linear output) of a pp=2 run without FSDP, on this rank's stage."""
    import torch

    cfg = tiny_train_config(
        out,
        parallel={"pp": 2, "dp_shard": 1, "mixed_precision": mixed_precision},
        schedule={"total_tokens": 8 * 32 * STEPS},
    )
    sequences = pattern_sequences()
    trainer = Trainer(cfg, stream_factory=lambda r, n: ArrayStream(sequences, r, n))
    dtypes = set()
    for module in trainer.module.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, args, output: dtypes.add(str(output.dtype)))
    trainer.run()
    found = logged_losses(out)
    return [found[s] for s in range(1, STEPS + 1)], dtypes


def test_bf16_under_pipeline_parallel_computes_in_bf16(fp32, tmp_path):
    """pp=2 without FSDP: with bf16 every stage's matmuls run in bf16 (autocast around the schedule's
    step: it was skipped there, and the run trained in fp32), and the losses track one process's."""
    (bf16, dtypes), (other_bf16, other_dtypes) = run_ranks(
        2, pipeline_stage_dtypes, str(tmp_path / "pp"), "bf16"
    )
    assert dtypes == other_dtypes == {"torch.bfloat16"}  # both stages
    assert bf16 == other_bf16 and bf16 != fp32 and bf16 == pytest.approx(fp32, rel=2e-2)
    (_, fp32_dtypes), _ = run_ranks(2, pipeline_stage_dtypes, str(tmp_path / "pp32"), "fp32")
    assert fp32_dtypes == {"torch.float32"}
