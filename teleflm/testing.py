"""Helpers for tests and benchmarks, kept in the package (as OLMo-core keeps `olmo_core.testing`) so
that spawned ranks and subprocesses import them like any module: a runner of a function on N gloo
ranks, the tiny model and training configs, learnable synthetic sequences, and a checkpoint written
the way the released Tele-FLM checkpoints are laid out."""

import json
import os
import shutil
import socket
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from teleflm.config import build
from teleflm.model import io
from teleflm.train.config import TrainConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, queue, init: bool, caller: tuple) -> None:
    environment, folder = caller
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(folder)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        if init:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        queue.put((rank, "ok", fn(*args)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    world_size: int, fn, *args, timeout: float = 300, init: bool = True, fresh: bool = False
) -> list:
    """Call `fn(*args)` on every rank of a fresh gloo process group (with `init=False`, in torchrun's
    environment before any group: `fn` makes it); return the ranks' results in rank order, or raise
    with the failing rank's traceback.

    Ranks are forked from a server that has imported torch, transformers and the trainer once (a
    spawned rank spends about 4 s importing them); each gets this process's environment and working
    folder as they are now. `fresh`: each rank a new interpreter instead, for what is fixed at
    process start (malloc's settings) or measured from it (resident memory)."""
    if fresh:
        ctx = mp.get_context("spawn")
    else:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["teleflm.testing", "teleflm.train.trainer"])
    queue = ctx.Queue()
    port = _free_port()
    caller = (dict(os.environ), os.getcwd())
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, init, caller))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]


# The shape of the tiny models: 2 layers of width 64, 4 heads sharing 2 KV heads.
TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
CONTEXT = 32
SEQUENCES_PER_STEP = 8


def tiny_config(**overrides):
    """A tiny TeleFLMConfig without muP (128-token vocabulary); `overrides` replace fields."""
    from teleflm.model import TeleFLMConfig

    fields = dict(vocab_size=128, intermediate_size=160, max_position_embeddings=256, **TINY_SHAPE)
    return TeleFLMConfig(**{**fields, **overrides})


# The model of `tiny_train_config`: a 2-layer muP model on a 96-token vocabulary.
TINY_MODEL = dict(
    vocab_size=96,
    intermediate_size=128,
    max_position_embeddings=CONTEXT,
    **TINY_SHAPE,
    use_mup=True,
    mup_scale_factor=2.0,
    output_mult=0.5,
)


def tiny_train_config(out: Path, **sections) -> TrainConfig:
    """A 2-layer muP model on 8 x 32-token steps, fp32, checkpoints every 5 steps."""
    raw = {
        "out": str(out),
        "model": dict(TINY_MODEL),
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


# The released checkpoints' tokenizer_config.json: LlamaTokenizer (SentencePiece) without BOS.
OFFICIAL_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": False,
    "add_eos_token": False,
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
}


def write_official_layout(
    model, tokenizer_model_path: str | Path, out_dir: str | Path, n_shards: int = 2
) -> Path:
    """Write `model` the way the released checkpoints are laid out (for tests): pickled
    `pytorch_model-0000N-of-0000M.bin` shards with `pytorch_model.bin.index.json`, a config.json with
    the official field names only, the model sources, the SentencePiece `tokenizer.model` and a
    tokenizer_config.json naming LlamaTokenizer without BOS."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    names = list(state)
    per_shard = -(-len(names) // n_shards)
    weight_map = {}
    for i in range(n_shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        chunk = names[i * per_shard : (i + 1) * per_shard]
        torch.save({name: state[name] for name in chunk}, out_dir / shard)
        weight_map.update(dict.fromkeys(chunk, shard))
    total_size = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out_dir / io.PICKLE_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    config = {field: getattr(model.config, field, None) for field in io.OFFICIAL_CONFIG_FIELDS}
    config |= {
        "architectures": ["TeleFLMForCausalLM"],
        "auto_map": {k: v for k, v in io.AUTO_MAP.items() if k != "AutoModel"},
        "model_type": "TeleFLM",
        "torch_dtype": str(next(iter(state.values())).dtype).removeprefix("torch."),
    }
    (out_dir / io.CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for source in io.MODEL_SOURCES:
        shutil.copyfile(Path(io.__file__).with_name(source), out_dir / source)

    shutil.copyfile(tokenizer_model_path, out_dir / "tokenizer.model")
    tokenizer_config = {**OFFICIAL_TOKENIZER_CONFIG, "model_max_length": model.config.max_position_embeddings}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out_dir
