"""Grow a training checkpoint into a new one that the trainer resumes from (in one process).

The source is read whole (weights, flattened AdamW state, trainer.json), the growth is planned and
validated before anything is written, and the result is written under a `.tmp` name and renamed
when complete, beside the source or anywhere else; the source is never modified.
"""

import json
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from teleflm import mup
from teleflm.grow.masks import GrowthMasks
from teleflm.grow.operators import grow_adam_state, grow_weights
from teleflm.grow.plan import GrowthError, GrowthPlan, make_plan
from teleflm.model import TeleFLMConfig
from teleflm.train.checkpoint import TRAINER_STATE, read_state, read_tensors, verify


def read_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(weights, flattened optimizer state, trainer state) of a DCP checkpoint, as plain objects."""
    path = Path(path)
    state = verify(path)
    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    flat = {
        key: torch.empty(m.size, dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata) else None
        for key, m in metadata.items()
    }
    read_tensors(flat, path, no_dist=True)
    weights = {k.removeprefix("model."): v for k, v in flat.items() if k.startswith("model.")}
    optim = {k.removeprefix("optim."): v for k, v in flat.items() if k.startswith("optim.")}
    return weights, optim, state


def write_checkpoint(path: Path, weights: dict, optim: dict, trainer_state: dict) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dcp.save({"model": weights, "optim": optim}, checkpoint_id=str(tmp), no_dist=True)
    (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def plan_for_checkpoint(
    source: Path, target_fields: dict, layers_at: list[int] | None = None, layer_init: str = "copy"
) -> tuple[TeleFLMConfig, GrowthPlan]:
    """Validate a growth of a checkpoint from its trainer.json alone (no tensors read)."""
    source = Path(source)
    state = read_state(source)
    ramp = state.get("growth_masks")
    if ramp and state["step"] - ramp["start_step"] < ramp["ramp_steps"]:
        raise GrowthError(
            f"{source} is in the middle of a growth ramp (step {state['step']}, ramp from step "
            f"{ramp['start_step']} over {ramp['ramp_steps']} steps); "
            "train past the ramp before growing again"
        )
    return make_plan(TeleFLMConfig.from_dict(state["model_config"]), target_fields, layers_at, layer_init)


def grow_checkpoint(
    source: Path,
    target: Path,
    target_fields: dict,
    hp: mup.MupHyperParams,
    ramp_steps: int,
    layers_at: list[int] | None = None,
    layer_init: str = "copy",
    seed: int = 0,
    growth_stage: int | None = None,
) -> tuple[Path, GrowthPlan]:
    """Write checkpoint `target`: `source` grown to `target_fields` (shape fields of the model config),
    new weights initialised by `hp`'s muP rules at the new width, masks starting their ramp at the
    source's step. Every check runs before anything is written."""
    if ramp_steps < 1:
        raise GrowthError(f"ramp_steps must be >= 1, got {ramp_steps}")
    new_config, plan = plan_for_checkpoint(source, target_fields, layers_at, layer_init)
    weights, optim, state = read_checkpoint(source)
    old_config = TeleFLMConfig.from_dict(state["model_config"])
    grown_weights = grow_weights(weights, plan, new_config, hp, seed)
    grown_optim = grow_adam_state(
        optim, plan, new_config, mup.width_mult(old_config), mup.width_mult(new_config)
    )
    masks = GrowthMasks(plan, start_step=state["step"], ramp_steps=ramp_steps)
    state = {**state, "model_config": new_config.to_diff_dict(), "growth_masks": masks.state_dict()}
    if growth_stage is not None:
        state["growth_stage"] = growth_stage
    return write_checkpoint(target, grown_weights, grown_optim, state), plan
