"""A tiny training config and synthetic data shared by the trainer and parallelism tests."""

import json
from pathlib import Path

import numpy as np

from teleflm.config import build
from teleflm.train.config import TrainConfig

CONTEXT = 32
SEQUENCES_PER_STEP = 8


def tiny_train_config(out: Path, **sections) -> TrainConfig:
    """A 2-layer muP model on 8 x 32-token steps, fp32, checkpoints every 5 steps."""
    raw = {
        "out": str(out),
        "model": dict(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=CONTEXT,
            use_mup=True,
            mup_scale_factor=2.0,
            output_mult=0.5,
        ),
        "data": {"context_length": CONTEXT},
        "batch": {"global_batch_tokens": CONTEXT * SEQUENCES_PER_STEP, "micro_batch_size": 2},
        "schedule": {"total_tokens": CONTEXT * SEQUENCES_PER_STEP * 10, "warmup_steps": 2},
        "mup": {"lr": 1e-2, "matrix_lr": 1e-2, "min_lr": 1e-3},
        "parallel": {"mixed_precision": "fp32"},
        "checkpoint": {"interval_steps": 5, "export_at_end": False},
        "logging": {"progress_bar": False},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return build(TrainConfig, raw, "tiny test config")


def pattern_sequences(n: int = 256, seed: int = 0) -> np.ndarray:
    """Learnable sequences: shifted arithmetic runs over the vocabulary, with noise."""
    rng = np.random.default_rng(seed)
    start = rng.integers(4, 90, size=(n, 1))
    step = rng.integers(1, 3, size=(n, 1))
    return 4 + (start + step * np.arange(CONTEXT + 1)) % 90


def logged_losses(out: Path) -> dict[int, float]:
    """Step -> loss from a run's metrics.jsonl (the last record of each step wins)."""
    losses = {}
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def train_losses(out: str, parallel: dict, steps: int) -> dict[int, float] | None:
    """A tiny run of `steps` steps on `pattern_sequences` under the `parallel` section (one process or
    a rank of many): its logged losses, None on a rank that logs none."""
    from teleflm.data.synthetic import ArrayStream
    from teleflm.train.trainer import Trainer

    cfg = tiny_train_config(
        Path(out),
        parallel=parallel,
        schedule={"total_tokens": CONTEXT * SEQUENCES_PER_STEP * steps},
        checkpoint={"interval_steps": 100},
    )
    sequences = pattern_sequences()
    Trainer(cfg, stream_factory=lambda rank, size: ArrayStream(sequences, rank, size)).run()
    return logged_losses(out) if (Path(out) / "metrics.jsonl").exists() else None
