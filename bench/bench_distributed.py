"""Distributed step time on gloo: 1, 2 and 4 ranks of FSDP and 2-way tensor parallel on one tiny
config, launched with torchrun exactly as a user would, at a fixed global batch (strong scaling).

    .venv/bin/python -m bench.bench_distributed [--steps 8] [--layouts 1,fsdp2,fsdp4,tp2] [--json out.json]

This machine has 2 cores: ranks share them (one thread each past 2 ranks), so the table shows the
cost of the collectives and of sharding, not a speed-up. On a GPU node the same layouts run on NCCL.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SHAPE = dict(
    hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, vocab_size=8192
)
CONTEXT, SEQUENCES = 256, 8
# name: (ranks, tensor-parallel degree)
LAYOUTS = {"1": (1, 1), "fsdp2": (2, 1), "fsdp4": (4, 1), "tp2": (2, 2)}


def worker(out: str, steps: int, tp: int) -> None:
    """One rank's run (under torchrun): the trainer on synthetic tokens; rank 0 writes its rates."""
    import torch

    from teleflm.config import build
    from teleflm.data.synthetic import ArrayStream
    from teleflm.train.config import TrainConfig
    from teleflm.train.trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, os.cpu_count() // world))
    dp = world // tp
    raw = {
        "out": out,
        "model": {**SHAPE, "max_position_embeddings": CONTEXT, "use_mup": True, "mup_scale_factor": 0.5},
        "data": {"context_length": CONTEXT},
        "batch": {"global_batch_tokens": CONTEXT * SEQUENCES, "micro_batch_size": SEQUENCES // dp},
        "schedule": {"total_tokens": CONTEXT * SEQUENCES * steps, "warmup_steps": 1},
        "parallel": {"mixed_precision": "fp32", "tp": tp},
        "checkpoint": {"interval_steps": 10**9, "export_at_end": False},
        "logging": {"progress_bar": False},
        "stability": {"warmup_steps": 10**9},
    }
    data = np.random.default_rng(0).integers(4, SHAPE["vocab_size"], size=(steps * SEQUENCES, CONTEXT + 1))
    trainer = Trainer(build(TrainConfig, raw, "bench_distributed"), lambda r, n: ArrayStream(data, r, n))
    trainer.save_checkpoint = lambda: Path(out)  # time training, not checkpoint writes
    trainer.run()


def measure(name: str, steps: int) -> dict:
    ranks, tp = LAYOUTS[name]
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={ranks}",
            "-m",
            "bench.bench_distributed",
            "--worker",
            out,
            "--steps",
            str(steps),
            "--tp",
            str(tp),
        ]
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rates = [
            json.loads(line)["tokens_per_s"]
            for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
        ]
    rate = statistics.median(rates[len(rates) // 2 :])
    return {
        "layout": name,
        "ranks": ranks,
        "tp": tp,
        "tokens_per_s": rate,
        "step_s": CONTEXT * SEQUENCES / rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"of {list(LAYOUTS)}")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.tp)
    print(
        f"model: {SHAPE}, {SEQUENCES} x {CONTEXT} tokens per step (global), fp32, gloo, {os.cpu_count()} cores"
    )
    print(f"{'layout':7} {'ranks':>5} {'step s':>8} {'tok/s':>8} {'vs 1 rank':>9}")
    rows = []
    for name in args.layouts.split(","):
        row = measure(name, args.steps)
        rows.append(row)
        base = rows[0]["tokens_per_s"]
        print(
            f"{name:7} {row['ranks']:5d} {row['step_s']:8.3f} {row['tokens_per_s']:8.0f} {row['tokens_per_s'] / base:9.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
