"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, resharding on load, never half-read.

Layout: `<out>/checkpoints/step-00000100/` holds DCP's shards and `.metadata`, plus `trainer.json`
(step, tokens, data-stream state, RNG) written last by rank 0. A checkpoint is written under a
`.tmp` name and renamed only when every rank has finished, so a crash mid-write leaves a `.tmp`
folder that is never loaded. Before loading, every file is checked to be whole (`verify`); a
checkpoint that still fails to load is named with its file, and the trainer falls back to the one
before it, setting the failed one aside as `step-N.unloadable` (kept, never deleted).
"""

import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from teleflm.config import read_json

TRAINER_STATE = "trainer.json"
UNLOADABLE = ".unloadable"  # suffix of a checkpoint set aside because it does not load
# What the trainer writes and resumes from; anything else in the folder (.tmp, .unloadable) is not one.
CHECKPOINT_NAME = re.compile(r"step-\d{8}(-grown)?")
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


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints, newest first; incomplete ones are skipped with a warning."""
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.glob("step-*"), reverse=True):
        if path.name.endswith(UNLOADABLE):  # set aside, with a warning, when it failed to load
            continue
        if not CHECKPOINT_NAME.fullmatch(path.name) or not is_complete(path):
            warnings.warn(f"checkpoint {path} is incomplete (cut short mid-write); ignoring it", stacklevel=2)
            continue
        found.append(path)
    return found


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones are skipped with a warning."""
    return next(iter(complete_checkpoints(root)), None)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: a file missing, cut short or damaged (the message names it)."""


def read_state(path: Path) -> dict:
    """The trainer state (trainer.json) of checkpoint `path`."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete teleflm checkpoint (.metadata and {TRAINER_STATE})")
    return read_json(path / TRAINER_STATE, CheckpointError)


def verify(path: Path) -> dict:
    """The trainer state of checkpoint `path` once its files are known whole: trainer.json and
    `.metadata` read, and every shard holds the bytes `.metadata` places in it."""
    path = Path(path)
    state = read_state(path)
    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as e:  # an unpickling error of any kind: the file is damaged
        raise CheckpointError(f"checkpoint file {path / '.metadata'} cannot be read: {e}") from None
    ends: dict[str, int] = {}
    for item in storage.values():
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    for name, end in sorted(ends.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        if file.stat().st_size < end:
            raise CheckpointError(
                f"checkpoint file {file} is cut short: {file.stat().st_size} bytes of {end}"
            )
    return state


def read_tensors(state_dict: dict, path: Path, **kwargs) -> None:
    """dcp.load into `state_dict`; its failure (a BaseException holding every rank's traceback) as a
    one-line CheckpointError."""
    try:
        dcp.load(state_dict, checkpoint_id=str(path), **kwargs)
    except CheckpointException as e:
        cause = next(iter(e.failures.values()))[0]
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded: {type(cause).__name__}: {first_line}"
        ) from None


def check_shape(state: dict, config, path: Path) -> None:
    """Refuse a checkpoint of another model shape before reading tensors: that is a config change,
    not a damaged checkpoint (ValueError, never a fallback)."""
    from teleflm.grow.plan import SHAPE_FIELDS

    saved = state["model_config"]
    differ = {f: (saved.get(f), getattr(config, f)) for f in ("vocab_size", *SHAPE_FIELDS)}
    differ = {f: pair for f, pair in differ.items() if pair[0] is not None and pair[0] != pair[1]}
    if differ:
        listed = ", ".join(f"{f} {a} (config: {b})" for f, (a, b) in differ.items())
        raise ValueError(f"checkpoint {path} is of another model shape: {listed}")


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


def load(path: Path, model, optimizer, model_config) -> dict:
    """Load model and optimizer state in place (any layout) and return the trainer state; a
    CheckpointError names a damaged file (`model_config`: the shape the checkpoint must have)."""
    trainer_state = verify(path)
    check_shape(trainer_state, model_config, path)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    read_tensors(state, path)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_OPTIONS
    )
    return trainer_state


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that does not load out of the way of resume and cleanup (rank 0)."""
    target, n = path.with_name(path.name + UNLOADABLE), 1
    while target.exists():  # set aside before, at this step, by an earlier attempt
        target, n = path.with_name(f"{path.name}.{n}{UNLOADABLE}"), n + 1
    if _is_rank0():
        path.rename(target)
    _barrier()
    return target


def load_model(path: Path):
    """An unsharded model with a checkpoint's weights, in one process (for export and evaluation);
    returns (model, trainer state)."""
    from teleflm.model import TeleFLMConfig, TeleFLMForCausalLM

    path = Path(path)
    state = verify(path)
    model = TeleFLMForCausalLM(TeleFLMConfig.from_dict(state["model_config"]))
    weights = {"model": model.state_dict()}
    read_tensors(weights, path, no_dist=True)
    model.load_state_dict(weights["model"])
    return model, state


def rng_state() -> list[int]:
    return torch.get_rng_state().tolist()


def set_rng_state(state: list[int]) -> None:
    torch.set_rng_state(torch.tensor(state, dtype=torch.uint8))


def default_dtype(device) -> str:
    """bf16 on GPUs; fp32 on CPUs, most of which emulate bf16 matmuls far slower than fp32."""
    return "bf16" if str(device).startswith("cuda") else "fp32"


def load_any_model(path: str | Path, dtype=None, device=None):
    """(model in eval mode, tokenizer or None, tokenizer folder or None) from a teleflm training
    checkpoint (`step-N` folder), one of our exports, or the official Hugging Face layout."""
    from teleflm.data.tokenizer import has_tokenizer, load_tokenizer
    from teleflm.model.io import default_device, load_pretrained

    path = Path(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if (path / TRAINER_STATE).exists():
        model, state = load_model(path)
        if state.get("growth_masks"):
            # The masks are part of the function being trained; the weights alone compute another.
            raise ValueError(
                f"{path} was saved in the middle of a growth ramp (masks from step "
                f"{state['growth_masks']['start_step']} over {state['growth_masks']['ramp_steps']} steps): "
                "use a checkpoint from after the ramp"
            )
        model = model.to(device=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
        tokenizer_dir = state.get("tokenizer") or None
        return model, (load_tokenizer(tokenizer_dir) if tokenizer_dir else None), tokenizer_dir
    model, tokenizer = load_pretrained(path, dtype=dtype, device=device)
    return model, tokenizer, (str(path) if has_tokenizer(path) else None)
