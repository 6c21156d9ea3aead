"""Training configs derived from one another (other widths, other hyper-parameters) and short scored
runs: the shared machinery of the hyper-parameter search and the loss-prediction ladder.

Configs are handled as raw TOML dicts, so that a derived config can be written back out as a file a
user can read and run with `teleflm pretrain`.
"""

import copy
import math
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# The card's seven searched hyper-parameters and the config table each lives in.
SEARCHED = {
    "lr": "mup",
    "matrix_lr": "mup",
    "min_lr": "mup",
    "std": "mup",
    "matrix_std": "mup",
    "input_mult": "model",
    "output_mult": "model",
}


def base_width(raw: dict) -> float:
    """The muP proxy width the config is defined against: hidden_size / mup_scale_factor."""
    model = raw.get("model", {})
    return model["hidden_size"] / model.get("mup_scale_factor", 1.0)


def at_width(raw: dict, width: int, head_dim: int | None = None, proxy_width: float | None = None) -> dict:
    """`raw` with the model at `width`: head_dim fixed while heads grow (docs/mup.md), FFN and
    kv-head ratios kept, and mup_scale_factor = width / proxy width (default: the config's own)."""
    model = raw["model"]
    head_dim = head_dim or model["hidden_size"] // model["num_attention_heads"]
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of the head dimension {head_dim}")
    heads = width // head_dim
    kv_ratio = model["num_attention_heads"] // model.get("num_key_value_heads", model["num_attention_heads"])
    out = copy.deepcopy(raw)
    out["model"].update(
        hidden_size=width,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // kv_ratio),
        intermediate_size=int(round(width * model["intermediate_size"] / model["hidden_size"])),
        mup_scale_factor=width / (proxy_width or base_width(raw)),
    )
    return out


def base_depth(raw: dict) -> float:
    """The muP proxy depth the config is defined against: num_hidden_layers / mup_depth_factor."""
    model = raw.get("model", {})
    return model["num_hidden_layers"] / model.get("mup_depth_factor", 1.0)


def at_depth(raw: dict, depth: int, proxy_depth: float | None = None) -> dict:
    """`raw` with `depth` layers and mup_depth_factor = depth / proxy depth (default: the config's
    own), so each residual branch is scaled by proxy depth / depth (CompleteP)."""
    out = copy.deepcopy(raw)
    out["model"].update(num_hidden_layers=depth, mup_depth_factor=depth / (proxy_depth or base_depth(raw)))
    return out


def with_hyperparams(raw: dict, values: dict) -> dict:
    """`raw` with searched hyper-parameters set (each to its own table)."""
    unknown = sorted(set(values) - set(SEARCHED))
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {unknown}; searchable: {sorted(SEARCHED)}")
    out = copy.deepcopy(raw)
    for name, value in values.items():
        out.setdefault(SEARCHED[name], {})[name] = float(value)
    return out


def hyperparams_of(raw: dict) -> dict:
    """The seven searched values a config holds (defaults where it leaves them out)."""
    from teleflm.train.config import MupSection

    defaults = MupSection()
    values = {}
    for name, table in SEARCHED.items():
        fallback = getattr(defaults, name) if table == "mup" else 1.0
        values[name] = float(raw.get(table, {}).get(name, fallback))
    return values


def parameter_count(model: dict, non_embedding: bool = True) -> int:
    """Parameters of the Tele-FLM of config fields `model` (nothing is built: works for 1T); the
    non-embedding ones (the N of scaling laws) or all of them."""
    from teleflm.model import TeleFLMConfig
    from teleflm.model.size import parameter_counts

    return parameter_counts(TeleFLMConfig(**model))["non_embedding" if non_embedding else "total"]


def load_sequences(path: str | Path) -> np.ndarray:
    """Packed training sequences: an .npy array of token ids, shape (n, context_length + 1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sequences file {path} does not exist")
    array = np.load(path)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path}: expected a 2-D integer array (sequences x tokens), got {array.shape}")
    return array


@dataclass
class RunData:
    """What a short run trains and is scored on: packed arrays (train, held-out), or, when both are
    None, the config's own shards (scored by their held-out bits per byte)."""

    train: np.ndarray | None = None
    heldout: np.ndarray | None = None

    @classmethod
    def from_file(cls, path: str | Path | None, heldout_fraction: float = 0.1) -> "RunData":
        if path is None:
            return cls()
        sequences = load_sequences(path)
        n_heldout = max(1, int(len(sequences) * heldout_fraction))
        if len(sequences) - n_heldout < 1:
            raise ValueError(f"{path}: too few sequences ({len(sequences)}) for a train/held-out split")
        return cls(train=sequences[n_heldout:], heldout=sequences[:n_heldout])

    def shuffled(self, seed: int) -> "RunData":
        """The same data with the training sequences in seed `seed`'s order (seed 0: as given); the
        config's shards get theirs from `data.seed` (see `seeded`)."""
        if self.train is None or seed == 0:
            return self
        return RunData(self.train[np.random.default_rng(seed).permutation(len(self.train))], self.heldout)


def seeded(raw: dict, seed: int) -> dict:
    """`raw` for its seed-th run: init seed and shard order both moved by `seed` (0: `raw` itself)."""
    from teleflm.train.config import DataSection, TrainConfig

    out = copy.deepcopy(raw)
    out["seed"] = raw.get("seed", TrainConfig.seed) + seed
    out.setdefault("data", {})["seed"] = raw.get("data", {}).get("seed", DataSection.seed) + seed
    return out


def training_flops(raw: dict) -> float:
    """Training FLOPs of a config's whole run: FLOPs per token (6N + attention) x its token budget."""
    from teleflm.model import TeleFLMConfig
    from teleflm.model.size import flops_per_token
    from teleflm.train.config import DataSection

    context = raw.get("data", {}).get("context_length", DataSection.context_length)
    return flops_per_token(TeleFLMConfig(**raw["model"]), context) * raw["schedule"]["total_tokens"]


def short_run_config(raw: dict, out: Path) -> dict:
    """A config for a scored run: writes only its final checkpoint, no export, no progress bar."""
    raw = copy.deepcopy(raw)
    raw["out"] = str(out)
    raw.setdefault("checkpoint", {}).update(interval_steps=10**9, keep_last=1, export_at_end=False)
    raw.setdefault("logging", {}).update(progress_bar=False)
    return raw


@torch.no_grad()
def heldout_loss(model, sequences: np.ndarray, real_vocab_size: int, batch_size: int = 8) -> float:
    """Mean next-token NLL (nats) of `model` over held-out packed sequences, over the tokenizer's
    `real_vocab_size` ids (padded embedding rows get no mass)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        tokens = torch.from_numpy(sequences[start : start + batch_size].astype(np.int64))
        logits = model(input_ids=tokens[:, :-1], use_cache=False).logits[..., :real_vocab_size]
        total += F.cross_entropy(
            logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum"
        ).item()
        count += tokens[:, 1:].numel()
    model.train()
    return total / count


def scored_run(raw: dict, out: Path, data: RunData, keep_checkpoints: bool = False) -> dict:
    """Train `raw` from scratch in `out` and score it. Returns {"loss" (final training loss),
    "objective" (held-out NLL, or val.bpb on shards), "status" ("ok" or "diverged"), "step"}."""
    from teleflm.data.synthetic import ArrayStream
    from teleflm.train.config import config_from
    from teleflm.train.stability import SpikeStop
    from teleflm.train.trainer import Trainer

    out = Path(out)
    if out.exists():  # a run killed half-way is started over, so every score comes from a full run
        shutil.rmtree(out)
    cfg = config_from(short_run_config(raw, out), str(out))
    factory = partial(ArrayStream, data.train) if data.train is not None else None
    trainer = Trainer(cfg, stream_factory=factory)
    try:
        result = trainer.run()
    except SpikeStop as e:
        return {
            "loss": math.inf,
            "objective": math.inf,
            "status": "diverged",
            "error": str(e),
            "step": trainer.step,
        }
    if data.heldout is not None:
        objective = heldout_loss(
            trainer.module, data.heldout, trainer.real_vocab_size, cfg.batch.micro_batch_size
        )
    elif "val.bpb" in result:
        objective = result["val.bpb"]
    else:  # ranking by training loss instead would reward memorising the training data
        raise ValueError(
            f"{out}: the run has no held-out bits per byte (its shards have no held-out documents?): "
            "no objective to rank it by; prepare the shards with a held-out split or give held-out sequences"
        )
    if not keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    status = "ok" if math.isfinite(objective) else "diverged"
    objective = objective if math.isfinite(objective) else math.inf
    return {"loss": result["loss"], "objective": objective, "status": status, "step": result["step"]}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(raw: dict, prefix: str = "") -> str:
    """TOML text of a config dict (scalars, lists, tables, arrays of tables), readable by tomllib."""
    lines, tables = [], []
    for key, value in raw.items():
        if (
            isinstance(value, dict)
            or isinstance(value, list)
            and value
            and all(isinstance(v, dict) for v in value)
        ):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in tables:
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            lines += ["", f"[{name}]", to_toml(value, f"{name}.").rstrip("\n")]
        else:
            for item in value:
                lines += ["", f"[[{name}]]", to_toml(item, f"{name}.").rstrip("\n")]
    return "\n".join(line for line in lines if line is not None).lstrip("\n") + "\n"
