"""Typed configuration of a pre-training run, loaded from TOML and validated in full before any work.

One dataclass per TOML table. `[model]` holds the official `config.json` fields of Tele-FLM, so a
model table reads exactly like a released config. Every table, `[model]` included, goes through one
check (`_table`): unknown keys and wrong types are refused by name, and each numeric key has a range
(a table's `RANGES`, `MODEL_RANGES` for `[model]`) that a value outside is refused against.
"""

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, get_args, get_type_hints

from teleflm.config import (
    AT_LEAST_ONE,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    ConfigError,
    Range,
    build,
    check_table,
    read_raw,
)
from teleflm.data.mixture import DomainWeight
from teleflm.grow.plan import SHAPE_FIELDS, GrowthError, make_plan
from teleflm.mup import MupHyperParams

# A [model] table: TeleFLMConfig's fields by their config.json names, checked like any other table.
MODEL_RANGES = {
    **dict.fromkeys(
        ["vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings"], AT_LEAST_ONE
    ),
    **dict.fromkeys(["num_hidden_layers", "num_attention_heads", "num_key_value_heads"], AT_LEAST_ONE),
    **dict.fromkeys(
        ["rms_norm_eps", "rope_theta", "mup_scale_factor", "mup_depth_factor", "output_mult", "input_mult"],
        POSITIVE,
    ),
    **dict.fromkeys(["pad_token_id", "bos_token_id", "eos_token_id"], NON_NEGATIVE),
    "pretraining_tp": AT_LEAST_ONE,
    "initializer_range": NON_NEGATIVE,
    "attention_dropout": FRACTION,
}


@functools.cache
def model_fields() -> dict[str, Any]:
    """The keys a [model] table may hold, with their types: TeleFLMConfig's own fields."""
    from teleflm.model import TeleFLMConfig

    hints = get_type_hints(TeleFLMConfig.__init__)
    names = [p for p in inspect.signature(TeleFLMConfig.__init__).parameters if p not in ("self", "kwargs")]
    # `int | None` takes an int in TOML (which has no null).
    return {
        name: next((a for a in get_args(hints[name]) if a is not type(None)), hints[name]) for name in names
    }


def check_model_table(raw, where: str) -> dict:
    """A [model] table: TeleFLMConfig's fields by their config.json names, checked like any other table."""
    return check_table(raw, model_fields(), MODEL_RANGES, where)


ModelTable = Annotated[dict[str, Any], check_model_table]


@dataclass
class MupSection(MupHyperParams):
    """The card's searched hyper-parameters; `min_lr` is the cosine floor of the base `lr` (all groups
    decay by the same ratio `min_lr / lr`)."""

    min_lr: float = 1.5e-5  # floor of the cosine for lr (every group decays by min_lr / lr)

    RANGES = dict.fromkeys(["lr", "matrix_lr", "std", "matrix_std"], POSITIVE)
    RANGES |= dict.fromkeys(["weight_decay", "min_lr"], NON_NEGATIVE)


@dataclass
class DataSection:
    shards: str = ""  # directory written by `teleflm data prepare`
    tokenizer: str = ""  # tokenizer directory the shards must have been made with
    context_length: int = 256  # tokens per training sequence
    document_mask: bool = False  # block attention across packed documents
    seed: int = 1234  # order of documents in each epoch
    mixture: list[DomainWeight] = field(default_factory=list)  # empty: the shards' own table
    repeat_past_epochs: bool = (
        False  # run (with a warning) even if the budget repeats a domain past its epochs
    )

    RANGES = dict(context_length=AT_LEAST_ONE, seed=NON_NEGATIVE)


@dataclass
class OptimSection:
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    eps: float = 1e-8  # AdamW
    grad_clip: float = 1.0  # global gradient-norm clip (0: none)

    RANGES = dict(beta1=FRACTION, beta2=FRACTION, eps=POSITIVE, grad_clip=NON_NEGATIVE)


@dataclass
class ScheduleSection:
    total_tokens: int = 0  # the run's length; the cosine ends here
    warmup_steps: int = 2000  # linear warmup, in optimizer steps

    RANGES = dict(total_tokens=AT_LEAST_ONE, warmup_steps=NON_NEGATIVE)


@dataclass
class BatchSection:
    global_batch_tokens: int = 5_505_024  # the card: 1,344 x 4,096
    micro_batch_size: int = 1  # sequences per device per forward

    RANGES = dict(global_batch_tokens=AT_LEAST_ONE, micro_batch_size=AT_LEAST_ONE)


@dataclass
class ParallelSection:
    dp_replicate: int = 1  # HSDP replicas (>1 with dp_shard>1 gives hybrid sharding)
    dp_shard: int = -1  # FSDP degree; -1: whatever the world size leaves
    tp: int = 1  # tensor-parallel degree (divides heads, kv heads, FFN, vocabulary)
    pp: int = 1  # pipeline stages (divides layers)
    pp_schedule: str = "1F1B"  # or "GPipe"
    activation_checkpointing: bool = False  # recompute each layer in backward
    compile: bool = False  # torch.compile each decoder layer
    mixed_precision: str = "bf16"  # or "fp32"
    timeout_s: int = 1800  # a collective waits this long for every rank before the run fails

    RANGES = dict(
        dp_replicate=AT_LEAST_ONE,
        dp_shard=Range(1, also=(-1,)),
        tp=AT_LEAST_ONE,
        pp=AT_LEAST_ONE,
        timeout_s=AT_LEAST_ONE,
    )


@dataclass
class CheckpointSection:
    interval_steps: int = 500  # steps between checkpoints (and one at the end)
    keep_last: int = 3  # checkpoints kept
    export_at_end: bool = True  # write out/export, a Hugging Face folder

    RANGES = dict(interval_steps=AT_LEAST_ONE, keep_last=AT_LEAST_ONE)


@dataclass
class LoggingSection:
    log_interval: int = 1  # steps between metric records
    eval_interval: int = 0  # steps between held-out BPB evaluations; 0: only at the end
    eval_sequences: int = 64  # held-out sequences per domain per evaluation
    # tokens between evaluation windows; 0: the context length (end to end). Shorter overlaps them,
    # and each token is scored after at least context - stride tokens (context / stride times the work)
    eval_stride: int = 0
    peak_flops_per_device: float = 0.0  # for MFU; 0: not reported
    progress_bar: bool = True  # tqdm bar with rate and ETA on rank 0

    RANGES = dict(
        log_interval=AT_LEAST_ONE,
        eval_interval=NON_NEGATIVE,
        eval_sequences=AT_LEAST_ONE,
        eval_stride=NON_NEGATIVE,
        peak_flops_per_device=NON_NEGATIVE,
    )


@dataclass
class StabilitySection:
    window: int = 100  # recent steps the verdict compares against
    sigma: float = 6.0  # a spike exceeds the recent level by this many deviations of the run's noise ...
    min_loss_jump: float = 0.5  # ... and a loss by at least this many nats
    min_grad_ratio: float = 100.0  # ... and a gradient norm by at least this factor
    warmup_steps: int = 20  # no spike verdicts before the window holds this many steps
    patience: int = 3  # this many spikes in a row are a new level (the step goes through), not bad batches
    action: str = "skip"  # skip | rollback | stop
    max_events: int = 10  # stop after this many events: the run is not recovering

    RANGES = dict(
        window=Range(2),
        sigma=POSITIVE,
        min_loss_jump=NON_NEGATIVE,
        min_grad_ratio=AT_LEAST_ONE,
        warmup_steps=NON_NEGATIVE,
        patience=AT_LEAST_ONE,
        max_events=NON_NEGATIVE,
    )


@dataclass
class GrowthStage:
    """One `[[growth]]` stage (progressive growth, docs/grow.md): at `at_tokens` the model grows to the
    shape in `model` by masked structural growth, and training goes on under `parallel`."""

    at_tokens: int = 0  # grow once the run has trained this many tokens
    model: ModelTable = field(default_factory=dict)  # target shape fields (mup_scale_factor follows)
    parallel: dict[str, Any] = field(default_factory=dict)  # [parallel] keys that change from this stage on
    ramp_steps: int = 100  # optimizer steps over which the growth masks ramp 0 -> 1
    layers_at: list[int] = field(default_factory=list)  # grown-model positions of new layers; empty: spread
    layer_init: str = "copy"  # new layers copy the one before them, or "interpolate", or "stack"

    RANGES = dict(at_tokens=AT_LEAST_ONE, ramp_steps=AT_LEAST_ONE)


@dataclass
class TrainConfig:
    out: str = "runs/default"  # checkpoints, logs, plots and the export go here
    seed: int = 0  # initialisation
    model: ModelTable = field(default_factory=dict)
    mup: MupSection = field(default_factory=MupSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    batch: BatchSection = field(default_factory=BatchSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    stability: StabilitySection = field(default_factory=StabilitySection)
    growth: list[GrowthStage] = field(default_factory=list)  # progressive growth schedule

    RANGES = dict(seed=NON_NEGATIVE)

    def model_config(self):
        from teleflm.model import TeleFLMConfig

        return TeleFLMConfig(**self.model)

    def sequences_per_step(self) -> int:
        return self.batch.global_batch_tokens // self.data.context_length

    def micro_batches_per_step(self, dp: int) -> int:
        """Micro-batches each of `dp` data-parallel ranks runs per optimizer step."""
        return self.sequences_per_step() // dp // self.batch.micro_batch_size

    def total_steps(self) -> int:
        return math.ceil(self.schedule.total_tokens / self.batch.global_batch_tokens)


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a TOML config, apply overrides, and validate."""
    return config_from(read_raw(path, overrides), str(path))


def config_from(raw: dict, where: str = "config") -> TrainConfig:
    """A validated TrainConfig from TOML tables (ConfigError, a ValueError, names the field)."""
    cfg = build(TrainConfig, raw, where)
    validate(cfg, where)
    return cfg


def validate(cfg: TrainConfig, where: str = "config", world_size: int | None = None) -> None:
    """Every check that can fail before work starts; raises ConfigError naming the field."""
    try:
        mc = cfg.model_config()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: [model]: {e}") from None
    p, b, d = cfg.parallel, cfg.batch, cfg.data
    if p.pp_schedule not in ("1F1B", "GPipe"):
        raise ConfigError(f"{where}: parallel.pp_schedule must be '1F1B' or 'GPipe', got {p.pp_schedule!r}")
    if p.mixed_precision not in ("bf16", "fp32"):
        raise ConfigError(f"{where}: parallel.mixed_precision must be 'bf16' or 'fp32'")
    if cfg.stability.action not in ("skip", "rollback", "stop"):
        raise ConfigError(f"{where}: stability.action must be skip, rollback or stop")
    if mc.num_attention_heads % p.tp or mc.num_key_value_heads % p.tp:
        raise ConfigError(
            f"{where}: parallel.tp={p.tp} must divide num_attention_heads ({mc.num_attention_heads}) "
            f"and num_key_value_heads ({mc.num_key_value_heads})"
        )
    if mc.vocab_size % p.tp:
        raise ConfigError(
            f"{where}: parallel.tp={p.tp} must divide vocab_size ({mc.vocab_size}); pad the vocabulary"
        )
    if mc.intermediate_size % p.tp:
        raise ConfigError(
            f"{where}: parallel.tp={p.tp} must divide intermediate_size ({mc.intermediate_size})"
        )
    if mc.num_hidden_layers % p.pp:
        raise ConfigError(
            f"{where}: parallel.pp={p.pp} must divide num_hidden_layers ({mc.num_hidden_layers})"
        )
    if d.context_length < 1 or d.context_length > mc.max_position_embeddings:
        raise ConfigError(
            f"{where}: data.context_length ({d.context_length}) must be in 1..max_position_embeddings "
            f"({mc.max_position_embeddings})"
        )
    if d.document_mask and p.pp > 1:
        raise ConfigError(f"{where}: data.document_mask is not supported with pipeline parallel (pp > 1)")
    if cfg.logging.eval_stride > d.context_length:
        raise ConfigError(
            f"{where}: logging.eval_stride ({cfg.logging.eval_stride}) exceeds data.context_length ({d.context_length})"
        )
    if cfg.schedule.total_tokens <= 0:
        raise ConfigError(f"{where}: schedule.total_tokens must be positive")
    if cfg.mup.min_lr > cfg.mup.lr:
        raise ConfigError(f"{where}: mup.min_lr ({cfg.mup.min_lr}) exceeds mup.lr ({cfg.mup.lr})")
    if b.global_batch_tokens % d.context_length:
        raise ConfigError(
            f"{where}: batch.global_batch_tokens ({b.global_batch_tokens}) is not a multiple of "
            f"data.context_length ({d.context_length})"
        )
    if world_size is not None:
        dp_shard = dp_shard_degree(cfg, world_size)
        dp = p.dp_replicate * dp_shard
        if p.dp_replicate * dp_shard * p.tp * p.pp != world_size:
            raise ConfigError(
                f"{where}: dp_replicate x dp_shard x tp x pp = {p.dp_replicate} x {dp_shard} x {p.tp} x "
                f"{p.pp} does not equal the world size {world_size}"
            )
        per_dp = b.micro_batch_size * d.context_length * dp
        if b.global_batch_tokens % per_dp:
            raise ConfigError(
                f"{where}: batch.global_batch_tokens ({b.global_batch_tokens}) is not divisible by "
                f"micro_batch_size x context_length x dp = {b.micro_batch_size} x {d.context_length} x {dp}"
            )
        if p.pp > 1 and b.global_batch_tokens // per_dp < p.pp:
            raise ConfigError(
                f"{where}: pipeline parallel needs at least pp={p.pp} micro-batches per step, "
                f"the batch gives {b.global_batch_tokens // per_dp}"
            )
    for section in ("shards", "tokenizer"):
        value = getattr(d, section)
        if value and not Path(value).exists():
            raise ConfigError(f"{where}: data.{section} {value} does not exist")
    if cfg.growth:
        validate_growth(cfg, where)


def dp_shard_degree(cfg: TrainConfig, world_size: int) -> int:
    p = cfg.parallel
    if p.dp_shard != -1:
        return p.dp_shard
    rest = p.dp_replicate * p.tp * p.pp
    if world_size % rest:
        raise ConfigError(f"world size {world_size} is not divisible by dp_replicate x tp x pp = {rest}")
    return world_size // rest


# ----- a [[growth]] schedule (its stages run by teleflm.train.stages) -----


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
    return dataclasses.replace(cfg, model=model, parallel=build(ParallelSection, parallel, where), growth=[])


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
