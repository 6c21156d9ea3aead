"""The spike guard: a planted bad batch is caught, logged, and the run recovers."""

import json
import math

import numpy as np
import pytest

from teleflm.data.synthetic import ArrayStream
from teleflm.testing import (
    CONTEXT,
    SEQUENCES_PER_STEP,
    logged_losses,
    pattern_sequences,
    tiny_train_config,
)
from teleflm.train.stability import SpikeGuard, SpikeStop, level
from teleflm.train.trainer import Trainer

BAD_STEP = 25  # 0-based index of the step whose batch is poisoned


def poisoned_stream(rank: int, size: int) -> ArrayStream:
    """Pattern data, except one step's batch is uniformly random tokens: far above the running loss."""
    rng = np.random.default_rng(1)
    first = BAD_STEP * SEQUENCES_PER_STEP
    poison = {g: rng.integers(4, 96, CONTEXT + 1) for g in range(first, first + SEQUENCES_PER_STEP)}
    return ArrayStream(pattern_sequences(), rank, size, poison=poison)


def without_the_bad_batch(rank: int, size: int) -> ArrayStream:
    """The poisoned stream with the poisoned batch taken out: the run that never saw it."""
    sequences, first = pattern_sequences(), BAD_STEP * SEQUENCES_PER_STEP
    kept = [
        sequences[g % len(sequences)]
        for g in range(40 * SEQUENCES_PER_STEP)
        if not 0 <= g - first < SEQUENCES_PER_STEP
    ]
    return ArrayStream(np.stack(kept), rank, size)


def train(tmp_path, action: str, stream=poisoned_stream) -> Trainer:
    cfg = tiny_train_config(
        tmp_path,
        schedule={"total_tokens": CONTEXT * SEQUENCES_PER_STEP * 32, "warmup_steps": 2},
        mup={"lr": 3e-2, "matrix_lr": 3e-2, "min_lr": 3e-3},
        stability={"action": action, "warmup_steps": 10},
        checkpoint={"interval_steps": 10},
    )
    trainer = Trainer(cfg, stream_factory=stream)
    trainer.run()
    return trainer


def events(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]


def test_data_that_moves_between_levels_does_not_stop_the_run(tmp_path):
    """Blocks of random tokens between blocks of pattern data (a domain far harder than the rest, met
    in runs): each block's first spikes turn into a level shift, and those spikes do not count toward
    max_events. Without that, the 4 skipped spikes exceed max_events = 2 and the run stops."""
    rng = np.random.default_rng(2)
    pattern = pattern_sequences()
    steps = 46
    rows = []
    for step in range(steps):
        hard = 10 <= step < 18 or 30 <= step < 38
        for i in range(SEQUENCES_PER_STEP):
            g = step * SEQUENCES_PER_STEP + i
            rows.append(rng.integers(4, 96, CONTEXT + 1) if hard else pattern[g % len(pattern)])
    sequences = np.stack(rows)
    cfg = tiny_train_config(
        tmp_path,
        schedule={"total_tokens": CONTEXT * SEQUENCES_PER_STEP * steps, "warmup_steps": 2},
        mup={"lr": 3e-2, "matrix_lr": 3e-2, "min_lr": 3e-3},
        stability={"action": "skip", "warmup_steps": 6, "max_events": 2},
        checkpoint={"interval_steps": 100},
    )
    trainer = Trainer(cfg, stream_factory=lambda rank, size: ArrayStream(sequences, rank, size))
    trainer.run()
    kinds = [e["event"] for e in events(tmp_path)]
    assert kinds.count("level_shift") == 2 and kinds.count("loss_spike") == 4
    assert trainer.step == steps and trainer.events == 0  # 46 steps applied, 4 batches skipped


@pytest.mark.parametrize("action", ["skip", "rollback"])
def test_planted_bad_batch_is_caught_and_run_recovers(tmp_path, action):
    trainer = train(tmp_path, action)
    spikes = [e for e in events(tmp_path) if e["event"].endswith("spike")]
    assert len(spikes) == 1 and spikes[0]["step"] == BAD_STEP and spikes[0]["action"] == action
    assert spikes[0]["event"] == "loss_spike" and spikes[0]["loss"] > spikes[0]["loss_limit"]
    if action == "rollback":
        rolled = [e for e in events(tmp_path) if e["event"] == "rolled_back"]
        assert rolled and rolled[0]["checkpoint"].endswith("step-00000020")
    losses = logged_losses(tmp_path)
    # Recovered: all 32 steps done, and the loss after the event is back below where it was before.
    assert trainer.step == 32
    assert losses[32] < losses[BAD_STEP]


def test_skip_equals_the_run_without_the_bad_batch_exactly(tmp_path):
    """A skipped batch leaves no trace: not in the weights, the moments, the schedule or the guard."""
    train(tmp_path / "skip", "skip")
    train(tmp_path / "clean", "skip", stream=without_the_bad_batch)
    assert not [e for e in events(tmp_path / "clean") if e["event"].endswith("spike")]
    skipped, clean = logged_losses(tmp_path / "skip"), logged_losses(tmp_path / "clean")
    assert sorted(skipped) == list(range(1, 33)) and skipped == clean


def test_stop_action_stops(tmp_path):
    with pytest.raises(SpikeStop, match=f"spike at step {BAD_STEP}"):
        train(tmp_path, "stop")


def test_guard_is_quiet_near_zero_loss():
    """The false stop of an SFT run: a loss settled near 0.02 wobbles to 0.08 (4x its mean). Nothing
    is wrong with that step; a ratio rule stopped the run there."""
    rng = np.random.default_rng(0)
    guard = SpikeGuard(warmup_steps=20)
    for _ in range(200):
        loss = 0.02 + abs(rng.normal(0, 0.004))
        norm = 0.08 * math.exp(rng.normal(0, 0.3))
        assert guard.verdict(loss, norm) is None
        guard.accept(loss, norm)
    assert guard.verdict(0.08291, 0.3691) is None


def mixed_batch_losses(seed: int, steps: int = 1000):
    """The loss of a small batch of mixed domains: near its level most steps, and in 1 step of 10 a
    batch heavy in a hard domain, 0.3 to 1.3 nats higher (the demo's batches rise as far: 10% of steps
    by 0.55 nats or more, the highest 1.37)."""
    rng = np.random.default_rng(seed)
    for step in range(steps):
        hard_mix = rng.uniform(0.3, 1.3) if rng.random() < 0.1 else 0.0
        yield 5.0 - step / steps + rng.normal(0, 0.08) + hard_mix


def judge(guard: SpikeGuard, loss: float, norm: float = 1.0) -> str | None:
    """One step as the trainer takes it: judged, then applied, rejected or taken as a new level."""
    verdict = guard.verdict(loss, norm)
    if verdict is None:
        guard.accept(loss, norm)
    elif verdict == "level_shift":
        guard.shift_level(loss, norm)
    else:
        guard.reject(loss, norm)
    return verdict


@pytest.mark.parametrize("seed", range(5))
def test_guard_is_quiet_on_small_batches_of_mixed_domains(seed):
    """Heavy-tailed batch losses are the run's own noise, not spikes. Judged by the bulk's spread
    alone, 67-86 of these 1,000 steps read as spikes (a run stops after max_events = 10), and a tail
    learned from the applied steps alone never grows past its own limit (10-13 in 3 of these seeds).
    A bad batch 4 nats up is still caught, and so is a second one 10 steps later."""
    guard = SpikeGuard()
    verdicts = [judge(guard, loss) for loss in mixed_batch_losses(seed)]
    assert sum(v is not None for v in verdicts) <= 3
    for _ in range(2):
        assert judge(guard, level(guard.losses) + 4.0) == "loss_spike"
        for loss in list(mixed_batch_losses(seed))[-10:]:  # ten more ordinary steps
            judge(guard, loss)


def test_guard_catches_loss_and_grad_norm_spikes():
    rng = np.random.default_rng(0)
    guard = SpikeGuard(warmup_steps=20)
    for step in range(60):
        loss, norm = 3.0 - step * 0.01 + rng.normal(0, 0.02), math.exp(rng.normal(0, 0.2))
        assert guard.verdict(loss, norm) is None
        guard.accept(loss, norm)
    assert guard.verdict(3.2, 1.0) == "loss_spike"  # 0.8 nats over the recent level
    assert guard.verdict(2.45, 400.0) == "grad_norm_spike"  # an ordinary loss with a 400x norm
    assert guard.verdict(2.7, 30.0) is None  # 0.3 nats and 30x: within the floors
    assert guard.verdict(float("nan"), 1.0) == guard.verdict(2.4, float("inf")) == "non_finite"
    # Before its window holds warmup_steps steps the guard gives no verdict on finite values.
    fresh = SpikeGuard(warmup_steps=20)
    fresh.accept(3.0, 1.0)
    assert fresh.verdict(30.0, 1e4) is None


def test_guard_state_round_trips():
    guard = SpikeGuard(window=5, warmup_steps=2)
    for loss in [1.0, 1.1, 0.9, 1.0, 1.05, 0.95]:
        guard.accept(loss, 2.0)
    again = SpikeGuard(window=5, warmup_steps=2)
    again.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert again.state_dict() == guard.state_dict() and len(again.losses) == 5
    assert again.loss_limit() == guard.loss_limit()


def test_a_lasting_jump_is_a_new_level_not_a_run_of_bad_batches():
    """An applied step that left the model worse makes every later batch read as a spike; skipping
    them cannot recover. The patience-th spike in a row is a level shift: it goes through, and the
    rejected losses become the window."""
    rng = np.random.default_rng(0)
    guard = SpikeGuard(warmup_steps=20, patience=3)
    for _ in range(40):
        loss = 0.25 + rng.normal(0, 0.01)
        guard.accept(loss, 1.0)
    verdicts = []
    for loss in (0.85, 0.93, 0.91):
        verdicts.append(guard.verdict(loss, 1.0))
        if verdicts[-1] == "loss_spike":
            guard.reject(loss, 1.0)
    assert verdicts == ["loss_spike", "loss_spike", "level_shift"]
    guard.shift_level(0.91, 1.0)
    assert list(guard.losses) == [0.85, 0.93, 0.91] and guard.rejected == []
    assert guard.verdict(0.88, 1.0) is None  # the new level
    assert guard.verdict(3.0, 1.0) is None  # too few steps at the new level for a verdict yet...
    for loss in (0.9, 0.87, 0.89) * 7:
        guard.accept(loss, 1.0)
    assert guard.verdict(3.0, 1.0) == "loss_spike"  # ...then spikes are judged against it
    # A spike, then a normal batch: the run of spikes is broken, the next spike starts counting anew.
    guard.reject(3.0, 1.0)
    guard.accept(0.88, 1.0)
    assert guard.rejected == [] and guard.verdict(3.1, 1.0) == "loss_spike"


def test_a_non_finite_step_stays_out_of_the_window():
    """A NaN batch, then spikes: the level shift takes the spikes, not the NaN, and the limits stay
    finite for the steps after it."""
    guard = SpikeGuard(warmup_steps=20, patience=3)
    for loss in (0.25, 0.26, 0.24) * 10:
        judge(guard, loss)
    assert judge(guard, float("nan")) == "non_finite"
    assert [judge(guard, loss) for loss in (0.9, 0.92, 0.91)] == ["loss_spike", "loss_spike", "level_shift"]
    assert list(guard.losses) == [0.9, 0.92, 0.91]
    for loss in (0.9, 0.91) * 10:
        judge(guard, loss)
    assert math.isfinite(guard.loss_limit()) and judge(guard, 3.0) == "loss_spike"


def test_the_command_says_why_a_run_stopped_and_exits_1(tmp_path, monkeypatch, capsys):
    """A run the guard stops ends `teleflm` with one line naming the limit and the events file, not a
    traceback."""
    import teleflm.cli.pretrain
    from teleflm.cli.main import main

    def stopped(args):
        train(tmp_path, "stop")

    monkeypatch.setattr(teleflm.cli.pretrain, "run", stopped)
    assert main(["pretrain", "--config", "unused.toml"]) == 1
    message = capsys.readouterr().err
    assert message.startswith("teleflm pretrain: stopped: stability guard: ") and "spike at step" in message
    assert 'stability.action is "stop"' in message and str(tmp_path / "events.jsonl") in message
