"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, resharding on load, never half-read.

Layout: `<out>/checkpoints/step-00000100/` holds DCP's shards and `.metadata`, plus `trainer.json`
(step, tokens, data-stream state, RNG) written last by rank 0. A checkpoint is written under a
`.tmp` name and renamed only when every rank has finished, so a crash mid-write leaves a `.tmp`
folder that is never loaded.
"""

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

TRAINER_STATE = "trainer.json"
# DCP warns that it runs in one process whenever torch.distributed is not initialised: that is intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file() and (path / TRAINER_STATE).is_file()


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones are skipped with a warning."""
    if not root.is_dir():
        return None
    for path in sorted(root.glob("step-*"), reverse=True):
        if path.name.endswith(".tmp") or not is_complete(path):
            warnings.warn(f"checkpoint {path} is incomplete (cut short mid-write); ignoring it", stacklevel=2)
            continue
        return path
    return None


def save(root: Path, step: int, model, optimizer, trainer_state: dict, keep_last: int) -> Path:
    """Checkpoint `step-N` under `root`; then only the last `keep_last` checkpoints are kept."""
    final = write(step_dir(root, step), model, optimizer, trainer_state)
    if _is_rank0():
        # Saves and growths cut short leave full-size `.tmp` folders that are never loaded.
        for leftover in root.glob("step-*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        for old in sorted(root.glob("step-*"))[:-keep_last]:  # grown checkpoints too
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def write(final: Path, model, optimizer, trainer_state: dict) -> Path:
    """Every rank writes its shards of model and optimizer to `<final>.tmp`; rank 0 adds
    trainer.json and renames it to `final` once all have finished."""
    tmp = final.with_name(final.name + ".tmp")
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    _barrier()
    if _is_rank0():
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    _barrier()
    return final


def load(path: Path, model, optimizer) -> dict:
    """Load model and optimizer state in place (any layout) and return the trainer state."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_OPTIONS
    )
    return json.loads((path / TRAINER_STATE).read_text())


def load_model(path: Path):
    """An unsharded model with a checkpoint's weights, in one process (for export and evaluation);
    returns (model, trainer state)."""
    from teleflm.model import TeleFLMConfig, TeleFLMForCausalLM

    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(
            f"{path} is not a complete teleflm checkpoint (.metadata and {TRAINER_STATE})"
        )
    state = json.loads((path / TRAINER_STATE).read_text())
    model = TeleFLMForCausalLM(TeleFLMConfig.from_dict(state["model_config"]))
    weights = {"model": model.state_dict()}
    dcp.load(weights, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(weights["model"])
    return model, state


def rng_state() -> list[int]:
    return torch.get_rng_state().tolist()


def set_rng_state(state: list[int]) -> None:
    torch.set_rng_state(torch.tensor(state, dtype=torch.uint8))
