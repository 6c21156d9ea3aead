"""A growth schedule in the pretrain config: `[[growth]]` stages by tokens (FLM-101B's 16B -> 51B -> 101B).

Stage 0 is `[model]` and `[parallel]`; stage k applies the model shape and parallel overrides of the
first k `[[growth]]` entries. A run knows its stage from its latest checkpoint (`growth_stage` in
trainer.json), so a resume lands in the right shape and layout. At a stage boundary the trainer
checkpoints, grows that checkpoint into `step-N-grown` (every rank its own shards) and rebuilds.
"""

import contextlib
import dataclasses
from pathlib import Path

from teleflm.grow.checkpoint import grow_checkpoint
from teleflm.grow.masks import GrowthMasks
from teleflm.grow.plan import SHAPE_FIELDS, GrowthError, make_plan
from teleflm.train import checkpoint
from teleflm.train.config import ConfigError, ParallelSection, TrainConfig, _build, validate


def stage_config(cfg: TrainConfig, stage: int) -> TrainConfig:
    """The run's config as stage `stage` sees it: model shape and layout after `stage` growths.
    Raises GrowthError naming the stage when a growth is impossible."""
    model, parallel = dict(cfg.model), dataclasses.asdict(cfg.parallel)
    for k, g in enumerate(cfg.growth[:stage], start=1):
        try:
            target, _ = make_plan(TrainConfig(model=model).model_config(), g.model, g.layers_at, g.layer_init)
        except GrowthError as e:
            raise GrowthError(f"growth[{k - 1}]: {e}") from None
        model.update({f: getattr(target, f) for f in (*SHAPE_FIELDS, "mup_scale_factor")})
        parallel.update(g.parallel)
    where = f"growth[{stage - 1}].parallel" if stage else "parallel"
    # The stage's view has no schedule of its own: growth decisions read the run's config.
    return dataclasses.replace(cfg, model=model, parallel=_build(ParallelSection, parallel, where), growth=[])


def checkpoint_stage(cfg: TrainConfig) -> int:
    """The growth stage of the run's latest readable checkpoint (0 without one); the trainer falls
    back past an unreadable one the same way."""
    for path in checkpoint.complete_checkpoints(Path(cfg.out) / "checkpoints"):
        with contextlib.suppress(checkpoint.CheckpointError):
            return checkpoint.read_state(path).get("growth_stage", 0)
    return 0


def current_stage(cfg: TrainConfig) -> tuple[int, TrainConfig]:
    """(stage, its config) for a run about to start or resume; the schedule is checked first."""
    if not cfg.growth:
        return 0, cfg
    validate_growth(cfg, "config")
    stage = checkpoint_stage(cfg)
    return stage, stage_config(cfg, stage)


def growth_due(cfg: TrainConfig, stage: int, tokens: int) -> bool:
    return stage < len(cfg.growth) and tokens >= cfg.growth[stage].at_tokens


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


def install_masks(
    masks: GrowthMasks | None, state: dict, module, tp_rank: int = 0, tp_size: int = 1
) -> GrowthMasks | None:
    """After a checkpoint load: drop the masks installed before, install the checkpoint's (if any)."""
    if masks is not None:
        masks.remove()
    if not state.get("growth_masks"):
        return None
    return GrowthMasks.from_state(state["growth_masks"], tp_rank, tp_size).install(module)


def validate_growth(cfg: TrainConfig, where: str) -> None:
    """Every stage can be grown to and trained in, and ramps end before the next stage and the run."""
    batch = cfg.batch.global_batch_tokens
    previous_end = 0
    for k, g in enumerate(cfg.growth):
        name = f"{where}: growth[{k}]"
        if g.ramp_steps < 1:
            raise ConfigError(f"{name}.ramp_steps must be >= 1")
        if g.at_tokens < previous_end or g.at_tokens <= 0:
            raise ConfigError(
                f"{name}.at_tokens ({g.at_tokens}) must be positive and not before the previous stage's "
                f"ramp ends ({previous_end} tokens)"
            )
        previous_end = g.at_tokens + g.ramp_steps * batch
        if previous_end > cfg.schedule.total_tokens:
            raise ConfigError(
                f"{name}: its ramp ends at {previous_end} tokens, past schedule.total_tokens "
                f"({cfg.schedule.total_tokens}): the final model would still carry masks"
            )
        try:
            stage = stage_config(cfg, k + 1)
        except GrowthError as e:
            raise ConfigError(f"{where}: {e}") from None
        validate(stage, f"{name} (stage {k + 1})")
