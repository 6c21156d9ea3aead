"""Progressive growth vs training the final size from scratch, for the same token budget, on the demo
data (the embedded KJV sample, byte-level BPE of 512). The grown run trains a small model for half the
budget, grows it width x2 and depth x2 by MSG (masks ramp over 1/12 of the steps), and trains on; the scratch
run trains the final shape throughout. Held-out loss is measured at every checkpoint (mid-ramp ones
with their masks installed).

    .venv/bin/python -m bench.bench_grow [--steps 240] [--json out.json]

Reports the training FLOPs (6N + attention per token, per stage's shape) each run needs to reach the
same held-out loss (the worse of the two final losses) and both final losses.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from teleflm.config import build
from teleflm.data.synthetic import ArrayStream
from teleflm.grow.masks import GrowthMasks
from teleflm.model.size import flops_per_token
from teleflm.train.checkpoint import load_model
from teleflm.train.config import GrowthStage, TrainConfig
from teleflm.train.stages import run as run_stages

VOCAB, CONTEXT, SEQUENCES = 512, 64, 16
SMALL = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2)
FINAL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4)
HELD_OUT = 32
# Masks ramp, and held-out loss is measured, every 1/12 of the run (20 steps of the default 240).
INTERVALS = 12


def demo_tokens() -> tuple[np.ndarray, np.ndarray]:
    """(training sequences, held-out sequences) of CONTEXT + 1 tokens from the embedded KJV sample."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from teleflm.data.sample import kjv_chapters

    text = "\n".join(kjv_chapters())
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([text[:500_000]], trainer)
    ids = np.array(tokenizer.encode(text).ids, dtype=np.int64)
    n = len(ids) // (CONTEXT + 1)
    sequences = ids[: n * (CONTEXT + 1)].reshape(n, CONTEXT + 1)
    return sequences[:-HELD_OUT], sequences[-HELD_OUT:]


def config(out: Path, steps: int, shape: dict, growth: list[dict]) -> TrainConfig:
    raw = {
        "out": str(out),
        "model": dict(
            vocab_size=VOCAB,
            max_position_embeddings=CONTEXT,
            use_mup=True,
            mup_scale_factor=shape["hidden_size"] / 64,
            output_mult=1.0,
            **shape,
        ),
        "data": {"context_length": CONTEXT},
        "batch": {"global_batch_tokens": CONTEXT * SEQUENCES, "micro_batch_size": SEQUENCES},
        "schedule": {"total_tokens": CONTEXT * SEQUENCES * steps, "warmup_steps": 10},
        "mup": {"lr": 1e-2, "matrix_lr": 1e-2, "min_lr": 1e-3, "std": 0.02, "matrix_std": 0.02},
        "parallel": {"mixed_precision": "fp32"},
        "checkpoint": {
            "interval_steps": max(steps // INTERVALS, 1),
            "keep_last": 1000,
            "export_at_end": False,
        },
        "logging": {"progress_bar": False},
    }
    cfg = build(TrainConfig, raw, "bench_grow")
    cfg.growth = [build(GrowthStage, g, "growth") for g in growth]
    return cfg


@torch.no_grad()
def held_out_curve(out: Path, held_out: np.ndarray) -> list[dict]:
    """Held-out loss and cumulative training FLOPs at every checkpoint of a run."""
    ids = torch.from_numpy(held_out)
    points, flops, last_tokens = [], 0.0, 0
    for path in sorted((out / "checkpoints").glob("step-*[0-9]")):
        model, state = load_model(path)
        if state.get("growth_masks"):
            GrowthMasks.from_state(state["growth_masks"]).install(model).set_step(state["step"])
        # FLOPs since the previous checkpoint, at this checkpoint's shape: growth happens right after
        # a checkpoint, so the steps in between all ran at the shape saved here.
        flops += flops_per_token(model.config, CONTEXT) * (state["tokens"] - last_tokens)
        last_tokens = state["tokens"]
        logits = model.eval()(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()
        points.append(
            {"step": state["step"], "tokens": state["tokens"], "flops": flops, "held_out_loss": loss}
        )
    return points


def flops_to_reach(curve: list[dict], target: float) -> float | None:
    return next((p["flops"] for p in curve if p["held_out_loss"] <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    train, held_out = demo_tokens()
    growth = [
        {
            "at_tokens": CONTEXT * SEQUENCES * args.steps // 2,
            "ramp_steps": max(args.steps // INTERVALS, 1),
            "model": FINAL,
        }
    ]
    runs = {"grown": (SMALL, growth), "scratch": (FINAL, [])}
    curves, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (shape, stages) in runs.items():
            out = Path(tmp) / name
            t0 = time.perf_counter()
            run_stages(config(out, args.steps, shape, stages), lambda r, n: ArrayStream(train, r, n))
            seconds[name] = time.perf_counter() - t0
            curves[name] = held_out_curve(out, held_out)
    target = max(c[-1]["held_out_loss"] for c in curves.values())
    result = {
        "steps": args.steps,
        "tokens": CONTEXT * SEQUENCES * args.steps,
        "target_held_out_loss": target,
        **{
            name: {
                "final_held_out_loss": c[-1]["held_out_loss"],
                "total_flops": c[-1]["flops"],
                "flops_to_target": flops_to_reach(c, target),
                "wall_seconds": seconds[name],
            }
            for name, c in curves.items()
        },
        "curves": curves,
    }
    result["flops_ratio_grown_over_scratch"] = (
        result["grown"]["flops_to_target"] / result["scratch"]["flops_to_target"]
    )
    for name in runs:
        r = result[name]
        print(
            f"{name:8s} final held-out loss {r['final_held_out_loss']:.4f}  total {r['total_flops']:.3g} FLOPs  "
            f"to reach {target:.4f}: {r['flops_to_target']:.3g} FLOPs  ({r['wall_seconds']:.0f} s)"
        )
    print(f"grown / scratch FLOPs to the same held-out loss: {result['flops_ratio_grown_over_scratch']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
