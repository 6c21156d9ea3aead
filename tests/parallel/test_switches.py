"""Activation checkpointing, torch.compile and bf16 change how a step runs, not what it learns."""

import pytest

from teleflm.data.synthetic import ArrayStream
from teleflm.train.trainer import Trainer
from tests.distributed import run_ranks
from tests.train.common import logged_losses, pattern_sequences, tiny_train_config

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


def pipeline_losses(out, mixed_precision) -> list[float]:
    return losses(out, pp=2, dp_shard=1, mixed_precision=mixed_precision)


def test_bf16_under_pipeline_parallel_computes_in_bf16(fp32, tmp_path):
    """pp=2 without FSDP: bf16 gives one process's bf16 losses, not fp32's (autocast around the
    schedule's step: it was skipped there, and the run trained in fp32). At this size bf16 moves the
    fourth loss by a few 1e-6 of itself, far more than the order of fp32 sums (1e-7)."""
    one_process = losses(tmp_path / "one", mixed_precision="bf16")
    bf16 = run_ranks(2, pipeline_losses, str(tmp_path / "pp"), "bf16")[0]
    assert abs(one_process[-1] - fp32[-1]) > 1e-6 * fp32[-1]
    assert bf16 == pytest.approx(one_process, rel=1e-7)
