"""bf16 training on CPU: autocast in one process, bf16 parameters with fp32 master weights and fp32
gradient reductions under FSDP; the losses track fp32's from the same start within 1% per step."""

import pytest

from teleflm.testing import run_ranks, train_losses

STEPS = 20
TOLERANCE = 0.01  # relative, per step


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> dict[int, float]:
    return train_losses(str(tmp_path_factory.mktemp("fp32")), {"mixed_precision": "fp32"}, STEPS)


def assert_tracks(bf16: dict[int, float], fp32: dict[int, float]) -> None:
    assert sorted(bf16) == list(range(1, STEPS + 1))
    for step, loss in fp32.items():
        assert bf16[step] == pytest.approx(loss, rel=TOLERANCE), (step, bf16, fp32)
    assert bf16 != fp32  # bf16 did run: its rounding shows in the losses
    assert fp32[STEPS] < fp32[1] - 0.5  # and the losses move, or tracking would prove little


def test_bf16_autocast_tracks_fp32(fp32, tmp_path):
    assert_tracks(train_losses(str(tmp_path), {"mixed_precision": "bf16"}, STEPS), fp32)


@pytest.mark.slow
def test_bf16_fsdp_tracks_fp32(fp32, tmp_path):
    losses = run_ranks(2, train_losses, str(tmp_path), {"mixed_precision": "bf16", "dp_shard": 2}, STEPS)[0]
    assert_tracks(losses, fp32)
