"""Configuration of a fine-tuning run: the pre-training tables plus `[sft]` (or `[dpo]`).

A fine-tuning TOML has the pre-training tables (`out`, `seed`, `[mup]` for learning rates,
`[data]` for `context_length`, `seed` and `document_mask`, `[optim]`, `[schedule]`, `[batch]`,
`[parallel]`, `[checkpoint]`, `[logging]`, `[stability]`) and an `[sft]` table (`teleflm sft`) or a
`[dpo]` table (`teleflm dpo`). It has no `[model]` and no `[[growth]]`: the model is the one `init`
holds, and `data.tokenizer` defaults to the tokenizer that came with it. `schedule.total_tokens`
defaults to `epochs` passes over the packed set (SFT) or the training pairs (DPO).
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

from teleflm.config import AT_LEAST_ONE, FRACTION, POSITIVE, ConfigError, build, read_raw
from teleflm.train.config import TrainConfig, model_fields, validate


@dataclass
class SFTSection:
    init: str = ""  # model to fine-tune: a teleflm checkpoint (step-N) or a Hugging Face export
    data: list[str] = field(default_factory=list)  # chat JSONL files or globs (docs/sft.md)
    on_error: str = "fail"  # a malformed line: "fail" stops, "skip" skips it (named by file:line either way)
    epochs: float = 3.0  # passes over the packed set; sets schedule.total_tokens when that is 0
    pack: bool = True  # several conversations per sequence, attention kept inside each (needs pp = 1)
    decontaminate: list[str] = field(
        default_factory=list
    )  # eval sets: conversations sharing an n-gram are dropped
    ngram: int = 13  # window of the decontamination, in tokens
    text_field: str = "text"  # JSONL field holding the text of the eval sets

    RANGES = dict(epochs=POSITIVE, ngram=AT_LEAST_ONE)


@dataclass
class DPOSection:
    init: str = ""  # the model to tune, usually an SFT model: a teleflm checkpoint (step-N) or an export
    data: list[str] = field(default_factory=list)  # preference JSONL files or globs (docs/sft.md)
    on_error: str = "fail"  # a malformed line: "fail" stops, "skip" skips it (named by file:line either way)
    epochs: float = 1.0  # passes over the training pairs; sets schedule.total_tokens when that is 0
    beta: float = 0.1  # DPO's temperature: how far the policy may move from the reference
    heldout_fraction: float = 0.1  # of the pairs, kept aside to measure preference accuracy and margin

    RANGES = dict(epochs=POSITIVE, beta=POSITIVE, heldout_fraction=FRACTION)


@dataclass
class SFTConfig:
    train: TrainConfig
    sft: SFTSection | DPOSection


def source_model(init: str, where: str) -> tuple[dict, str]:
    """(model config fields, tokenizer folder) of the checkpoint or export to fine-tune."""
    from teleflm.data.tokenizer import has_tokenizer
    from teleflm.model.io import load_config
    from teleflm.train.checkpoint import TRAINER_STATE, read_state

    path = Path(init)
    if not init or not path.is_dir():
        raise ConfigError(f"{where}: sft.init {init!r} is not a checkpoint or export folder")
    if (path / TRAINER_STATE).is_file():
        state = read_state(path)
        fields, tokenizer = state["model_config"], state.get("tokenizer") or ""
    else:
        fields, tokenizer = load_config(path).to_diff_dict(), str(path) if has_tokenizer(path) else ""
    # The [model] table the fine-tuning config gets, as TOML could write it: the model's fields set
    # (None is each optional field's default), not config.json's bookkeeping.
    return {k: v for k, v in fields.items() if k in model_fields() and v is not None}, tokenizer


def load_sft_config(path: str | Path, overrides: list[str] = (), table: str = "sft") -> SFTConfig:
    """Read and check a fine-tuning config with an `[sft]` (or `[dpo]`) table; a schedule left at 0
    tokens is set by `complete` once the data's size is known."""
    raw = read_raw(path, overrides)
    where = str(path)
    for other in ("model", "growth", *({"sft", "dpo"} - {table})):
        if other in raw:
            raise ConfigError(
                f"{where}: a `teleflm {table}` config has no [{other}]: the model is {table}.init's"
            )
    section = build(DPOSection if table == "dpo" else SFTSection, raw.pop(table, {}), f"{where}: [{table}]")
    if section.on_error not in ("fail", "skip"):
        raise ConfigError(f"{where}: {table}.on_error must be 'fail' or 'skip', got {section.on_error!r}")
    if not section.data:
        raise ConfigError(f"{where}: {table}.data names no JSONL file")
    raw["model"], tokenizer = source_model(section.init, where)
    raw.setdefault("data", {}).setdefault("tokenizer", tokenizer)
    if not raw["data"]["tokenizer"]:
        raise ConfigError(f"{where}: {section.init} comes with no tokenizer: set data.tokenizer")
    if table == "dpo":
        if raw.get("parallel", {}).get("pp", 1) > 1:
            raise ConfigError(f"{where}: teleflm dpo runs under dp and tp; parallel.pp must be 1")
        micro = raw.get("batch", {}).get("micro_batch_size", 1)
        if micro % 2:
            raise ConfigError(
                f"{where}: batch.micro_batch_size ({micro}) must be even: a pair's two sides go together"
            )
    else:
        # Packed conversations must not see each other (validate refuses it with pipelines: pp > 1).
        raw["data"]["document_mask"] = section.pack
    schedule = raw.setdefault("schedule", {})
    derive_length = schedule.get("total_tokens", 0) == 0
    if derive_length:
        schedule["total_tokens"] = 1  # a placeholder that validates; `complete` sets the length
    train = build(TrainConfig, raw, where)
    validate(train, where)
    if derive_length:
        train.schedule.total_tokens = 0
    return SFTConfig(train, section)


def complete(cfg: SFTConfig, sequences: int) -> None:
    """Set the schedule's length from the data when the config leaves it at 0 (`sequences`: packed
    rows for SFT, rows of the training pairs for DPO)."""
    t = cfg.train
    if t.schedule.total_tokens == 0:
        steps = max(1, math.ceil(cfg.sft.epochs * sequences / t.sequences_per_step()))
        t.schedule.total_tokens = steps * t.batch.global_batch_tokens
