"""A deadline moves a run's end with its step rate, so the cosine still ends at its floor on the last
step; the arithmetic on a fake clock, and a real run whose deadline has passed."""

import json
from types import SimpleNamespace

import pytest

from teleflm.data.synthetic import ArrayStream
from teleflm.testing import pattern_sequences, tiny_train_config
from teleflm.train import deadline as deadline_module
from teleflm.train.deadline import Deadline
from teleflm.train.schedule import lr_factor
from teleflm.train.trainer import Trainer


def fake_trainer(step: int):
    cfg = SimpleNamespace(
        logging=SimpleNamespace(eval_interval=10),
        checkpoint=SimpleNamespace(interval_steps=10),
        schedule=SimpleNamespace(total_tokens=0),
        batch=SimpleNamespace(global_batch_tokens=100),
    )
    return SimpleNamespace(cfg=cfg, step=step, dims=SimpleNamespace(world_size=1))


def test_the_end_follows_the_step_rate(monkeypatch):
    monkeypatch.setattr(deadline_module.time, "time", lambda: 0.0)
    d = Deadline(at=100.0, evaluation_s=5.0, checkpoint_s=1.0, tail_s=10.0)
    trainer = fake_trainer(step=0)
    # 90 s left; 90 one-second steps would bring 9 evaluations and 9 checkpoints (54 s) and the final
    # ones (6 s): 30 s of steps remain.
    assert d.replan(trainer, 1.0) == 30
    assert trainer.cfg.schedule.total_tokens == 30 * 100
    # Slower steps (the median of the recent ones moves to 3 s): the end comes earlier.
    d.replan(trainer, 3.0)
    assert d.replan(trainer, 3.0) < 30
    # Past the deadline: the run ends now, or at its minimum.
    monkeypatch.setattr(deadline_module.time, "time", lambda: 200.0)
    trainer.step = 2
    assert d.replan(trainer, 1.0) == 2
    assert Deadline(100.0, 5.0, 1.0, 10.0, min_steps=4).replan(trainer, 1.0) == 4


def test_a_passed_deadline_ends_the_run_at_its_minimum_with_the_schedule_done(tmp_path):
    cfg = tiny_train_config(tmp_path, schedule={"total_tokens": 8 * 32 * 10, "warmup_steps": 1})
    sequences = pattern_sequences()
    trainer = Trainer(cfg, stream_factory=lambda rank, size: ArrayStream(sequences, rank, size))
    trainer.deadline = Deadline(at=0.0, evaluation_s=0.0, checkpoint_s=0.0, tail_s=0.0, min_steps=3)
    result = trainer.run()
    assert result["step"] == 3 and (tmp_path / "checkpoints" / "step-00000003").is_dir()
    assert cfg.schedule.total_tokens == 3 * cfg.batch.global_batch_tokens
    # The last step ran on the cosine of the 3-step run, not of the 10 planned.
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last_lr = [r["lr"] for r in records if "lr" in r][-1]
    tokens = cfg.batch.global_batch_tokens
    factor = lr_factor(2, 2 * tokens, 1, tokens, 3 * tokens, cfg.mup.min_lr / cfg.mup.lr)
    assert last_lr == pytest.approx(factor * cfg.mup.lr)
