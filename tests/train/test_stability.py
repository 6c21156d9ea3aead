"""The spike guard: a planted bad batch is caught, logged, and the run recovers."""

import json

import numpy as np
import pytest

from teleflm.data.synthetic import ArrayStream
from teleflm.train.trainer import SpikeStop, Trainer
from tests.train.common import (
    CONTEXT,
    SEQUENCES_PER_STEP,
    logged_losses,
    pattern_sequences,
    tiny_train_config,
)

BAD_STEP = 25  # 0-based index of the step whose batch is poisoned


def poisoned_stream(rank: int, size: int) -> ArrayStream:
    """Pattern data, except one step's batch is uniformly random tokens: far above the running loss."""
    rng = np.random.default_rng(1)
    first = BAD_STEP * SEQUENCES_PER_STEP
    poison = {g: rng.integers(4, 96, CONTEXT + 1) for g in range(first, first + SEQUENCES_PER_STEP)}
    return ArrayStream(pattern_sequences(), rank, size, poison=poison)


def train(tmp_path, action: str) -> Trainer:
    cfg = tiny_train_config(
        tmp_path,
        schedule={"total_tokens": CONTEXT * SEQUENCES_PER_STEP * 32, "warmup_steps": 2},
        mup={"lr": 3e-2, "matrix_lr": 3e-2, "min_lr": 3e-3},
        stability={"action": action, "warmup_steps": 10, "spike_factor": 2.0},
        checkpoint={"interval_steps": 10},
    )
    trainer = Trainer(cfg, stream_factory=poisoned_stream)
    trainer.run()
    return trainer


def events(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("action", ["skip", "rollback"])
def test_planted_bad_batch_is_caught_and_run_recovers(tmp_path, action):
    trainer = train(tmp_path, action)
    spikes = [e for e in events(tmp_path) if e["event"] == "spike"]
    assert len(spikes) == 1 and spikes[0]["step"] == BAD_STEP and spikes[0]["action"] == action
    assert spikes[0]["loss"] > 2.0 * spikes[0]["loss_ema"]
    if action == "rollback":
        rolled = [e for e in events(tmp_path) if e["event"] == "rolled_back"]
        assert rolled and rolled[0]["checkpoint"].endswith("step-00000020")
    losses = logged_losses(tmp_path)
    # Recovered: all 32 steps done, and the loss after the event is back below where it was before.
    assert trainer.step == 32
    assert losses[32] < losses[BAD_STEP]


def test_stop_action_stops(tmp_path):
    with pytest.raises(SpikeStop, match=f"spike at step {BAD_STEP}"):
        train(tmp_path, "stop")
