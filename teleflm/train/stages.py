"""Running a pre-training run: its one stage, or the stages of its `[[growth]]` schedule (FLM-101B's
16B -> 51B -> 101B), each trained by a Trainer of its own shape and layout.

Stage 0 is `[model]` and `[parallel]`; stage k applies the model shape and parallel overrides of the
first k `[[growth]]` entries. A run knows its stage from its latest checkpoint (`growth_stage` in
trainer.json), so a resume lands in the right shape and layout. At a stage boundary the stage's
trainer stops at its checkpoint and frees its model; that checkpoint is grown into `step-N-grown`
(every rank its own shards, teleflm.train.growth), and the next stage's trainer resumes from it.
"""

import contextlib
from pathlib import Path

from teleflm.train import checkpoint
from teleflm.train.config import TrainConfig, stage_config, validate_growth
from teleflm.train.growth import grow_checkpoint
from teleflm.train.monitor import append_event
from teleflm.train.trainer import Trainer


def checkpoint_stage(cfg: TrainConfig) -> int:
    """The growth stage of the run's latest readable checkpoint (0 without one); the trainer falls
    back past an unreadable one the same way."""
    for path in checkpoint.complete_checkpoints(Path(cfg.out) / "checkpoints"):
        with contextlib.suppress(checkpoint.CheckpointError):
            return checkpoint.read_state(path).get("growth_stage", 0)
    return 0


def grow_run_checkpoint(cfg: TrainConfig, stage: int, source: Path) -> Path:
    """Grow the run's checkpoint `source` by growth[stage] into `<source>-grown` (stage + 1), sharded
    over every rank (call it on all of them)."""
    g = cfg.growth[stage]
    path, _, _ = grow_checkpoint(
        source,
        source.with_name(source.name + "-grown"),
        stage_config(cfg, stage + 1),
        g.ramp_steps,
        g.layers_at,
        g.layer_init,
        seed=cfg.seed + stage + 1,
        growth_stage=stage + 1,
    )
    return path


def run(cfg: TrainConfig, stream_factory=None) -> dict:
    """Train the run `cfg` describes to its end (or resume it): stage after stage, growing the
    checkpoint at each boundary; returns the last stage's figures. `stream_factory`: see Trainer."""
    if cfg.growth:
        validate_growth(cfg, "config")  # before any work
    while True:
        stage = checkpoint_stage(cfg) if cfg.growth else 0
        trainer = Trainer(stage_config(cfg, stage) if cfg.growth else cfg, stream_factory, growth_stage=stage)
        boundary = cfg.growth[stage].at_tokens if stage < len(cfg.growth) else None
        result = trainer.run(until_tokens=boundary)
        if "stopped_at" not in result:
            return result
        trainer.close()  # every rank then holds only its shards of the grown model
        grown = grow_run_checkpoint(cfg, stage, result["stopped_at"])
        if trainer.rank == 0:
            append_event(Path(cfg.out), result["step"], "grown", checkpoint=str(grown))
