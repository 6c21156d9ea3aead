"""Progressive growth vs training the final size from scratch, for the same token budget, on the demo
data (the embedded KJV sample, byte-level BPE of 512), over several seeds. Seven runs per seed, all
ending at the final shape (hidden 128, 4 layers), the growing ones grown at half the budget (or at
`--grow-step`):

- msg: a small model (hidden 64, 2 layers) grown width x2 and depth x2 by masked structural growth
  (masks ramp over 1/12 of the steps);
- msg_width and msg_depth: the same growth in one dimension only, from hidden 64 with 4 layers and
  from hidden 128 with 2 layers (new layers copy their neighbours, masked), to see which part costs;
- stack: hidden 128 with 2 layers, stacked to 4 (layers 0, 1, 0, 1: G_stack's operator, arXiv
  2405.15319) with a one-step ramp, so no fade-in;
- stack_x4: hidden 128 with 1 layer, stacked 4x (G_stack's growth factor of 4);
- msg_depth_x4: the same 4x in depth by MSG (the new layers copies of the one, masked, ramped in);
- scratch: the final shape throughout.

    .venv/bin/python -m bench.bench_grow [--steps 240] [--seeds 0,1,2] [--grow-step N] [--runs stack,scratch]
        [--lrs 5e-3,1e-2] [--json out.json] [--plot F.png]

Every seed shuffles the training windows its own way and sets the init. Held-out loss is measured
every 1/24 of the run (mid-ramp checkpoints with their masks installed). Reports, per seed, the
training FLOPs (6N + attention per token, at each stage's shape) each run needs to reach the scratch
run's final held-out loss (linear between checkpoints), their ratio to scratch's, and the mean ratio
with a 90% t-interval over the seeds. With several `--lrs` every run trains at each, and the target is
scratch's loss at its best lr (lowest mean final loss): each run is tuned over the same grid, and
none is compared against a scratch run held at a rate that suits the grown one.
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
STACK_SMALL = {**FINAL, "num_hidden_layers": 2}
STACK_ONE = {**FINAL, "num_hidden_layers": 1}
DEEP_SMALL = {**SMALL, "num_hidden_layers": 4}
HELD_OUT = 32
# Masks ramp over 1/12 of the run (20 steps of the default 240); held-out loss every 1/24.
RAMP_SHARE, INTERVALS = 12, 24


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


def config(
    out: Path, steps: int, shape: dict, growth: list[dict], seed: int = 0, lr: float = 1e-2
) -> TrainConfig:
    raw = {
        "out": str(out),
        "seed": seed,
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
        "mup": {"lr": lr, "matrix_lr": lr, "min_lr": lr / 10, "std": 0.02, "matrix_std": 0.02},
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
    """FLOPs at which the held-out loss first reaches `target`, linear between the checkpoints that
    bracket the crossing; None if it never does."""
    previous = None
    for p in curve:
        if p["held_out_loss"] <= target:
            if previous is None:
                return p["flops"]
            share = (previous["held_out_loss"] - target) / (previous["held_out_loss"] - p["held_out_loss"])
            return previous["flops"] + share * (p["flops"] - previous["flops"])
        previous = p
    return None


def t_interval(values: list[float], level: float = 0.9) -> tuple[float, float, float]:
    """Mean and the `level` Student-t interval of the mean."""
    from scipy.stats import t

    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, mean, mean
    half = t.ppf((1 + level) / 2, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
    return mean, mean - half, mean + half


def plot(curves: dict, lrs: dict[str, float], path: Path) -> None:
    """curves: (name, seed) -> held-out curve, each run at its lr in `lrs`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    colors = {
        "msg": "C0",
        "msg_width": "C1",
        "msg_depth": "C4",
        "stack": "C2",
        "stack_x4": "C9",
        "msg_depth_x4": "C5",
        "scratch": "C3",
    }
    for (name, seed), curve in curves.items():
        ax.plot(
            [p["flops"] for p in curve],
            [p["held_out_loss"] for p in curve],
            "-",
            color=colors[name],
            lw=1,
            alpha=0.8,
            label=f"{name}, lr {lrs[name]:g}" if seed == min(s for _, s in curves) else None,
        )
    finals = [c[-1]["held_out_loss"] for (n, _), c in curves.items() if n == "scratch"]
    ax.axhline(np.mean(finals), color="C3", ls=":", lw=1, label="scratch final (seed mean)")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_ylim(min(finals) - 0.15, min(finals) + 1.2)
    ax.legend(fontsize=8)
    ax.set_title("growth vs scratch, each at its best lr; one line per seed", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def growth_runs(at_tokens: int, ramp: int) -> dict[str, tuple[dict, list[dict]]]:
    """name -> (the starting shape, its growth stages); every run ends at FINAL."""
    masked = {"at_tokens": at_tokens, "ramp_steps": ramp, "model": FINAL}
    stacked = {"at_tokens": at_tokens, "ramp_steps": 1, "model": FINAL, "layer_init": "stack"}
    return {
        "msg": (SMALL, [masked]),
        "msg_width": (DEEP_SMALL, [masked]),
        "msg_depth": (STACK_SMALL, [masked]),
        "stack": (STACK_SMALL, [{**stacked, "layers_at": [2, 3]}]),
        "stack_x4": (STACK_ONE, [{**stacked, "layers_at": [1, 2, 3]}]),
        "msg_depth_x4": (STACK_ONE, [masked]),
        "scratch": (FINAL, []),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--grow-step", type=int, help="the step at which the growing runs grow (default: half)"
    )
    parser.add_argument(
        "--lrs",
        default="1e-2",
        help="comma-separated learning rates (matrix_lr = lr, min_lr = lr / 10): every run trains at "
        "each, and each run at its best (lowest mean final loss) is compared with scratch at its best",
    )
    parser.add_argument("--runs", help="a comma-separated subset of the runs (scratch is always run)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, default=Path("runs/bench/grow.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, held_out = demo_tokens()
    seeds = [int(x) for x in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    runs = growth_runs(
        CONTEXT * SEQUENCES * (args.grow_step or args.steps // 2), max(args.steps // RAMP_SHARE, 1)
    )
    if args.runs:
        chosen = {*args.runs.split(","), "scratch"}
        unknown = sorted(chosen - set(runs))
        if unknown:
            parser.error(f"--runs: unknown {unknown}; the runs are {sorted(runs)}")
        runs = {name: run for name, run in runs.items() if name in chosen}
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            # Every seed shuffles the windows: the book read in order (Genesis to Revelation) is a
            # drifting distribution that no pretraining mixture has.
            order = train[np.random.default_rng(seed).permutation(len(train))]
            for lr in lrs:
                for name, (shape, stages) in runs.items():
                    out = Path(tmp) / f"{name}-{lr:g}-{seed}"
                    t0 = time.perf_counter()
                    cfg = config(out, args.steps, shape, stages, seed, lr)
                    run_stages(cfg, lambda r, n, data=order: ArrayStream(data, r, n))
                    curves[name, lr, seed] = held_out_curve(out, held_out)
                    print(
                        f"seed {seed} lr {lr:g} {name:8s} final held-out loss "
                        f"{curves[name, lr, seed][-1]['held_out_loss']:.4f} ({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
    result = compare(curves, runs, lrs, seeds)
    result.update(lrs=lrs, steps=args.steps, tokens=CONTEXT * SEQUENCES * args.steps, seeds=seeds)
    best = result["best_lr"]
    plot({(n, s): c for (n, lr, s), c in curves.items() if lr == best[n]}, best, args.plot)
    print(f"plot (each run at its best lr): {args.plot}")
    if args.json:
        result["curves"] = {f"{n}/{lr:g}/{s}": c for (n, lr, s), c in curves.items()}
        args.json.write_text(json.dumps(result, indent=1))


def compare(curves: dict, runs: dict, lrs: list[float], seeds: list[int]) -> dict:
    """Per run and lr, the FLOPs to reach scratch's final held-out loss at scratch's best lr, over
    scratch's FLOPs, per seed and as a t-interval; printed, and returned as data."""
    best = {
        name: min(lrs, key=lambda lr: np.mean([curves[name, lr, s][-1]["held_out_loss"] for s in seeds]))
        for name in runs
    }
    print("best lr (lowest mean final held-out loss): " + ", ".join(f"{n} {lr:g}" for n, lr in best.items()))
    result = {"best_lr": best, "ratios": {}}
    for name in runs:
        if name == "scratch":
            continue
        result["ratios"][name] = {}
        for lr in lrs:
            values = []
            for seed in seeds:
                scratch = curves["scratch", best["scratch"], seed]
                target = scratch[-1]["held_out_loss"]
                reach = flops_to_reach(curves[name, lr, seed], target)
                # A seed whose run never reached the scratch loss has no ratio (it is not a smaller
                # one): the interval is over the seeds that reached it, and how many did is part of it.
                if reach is not None:
                    values.append(reach / flops_to_reach(scratch, target))
            row = {"reached": len(values), "per_seed": values}
            line = (
                f"{name} at lr {lr:g}{' (its best)' if lr == best[name] else ''}: FLOPs to scratch's "
                f"loss at lr {best['scratch']:g} / scratch's: reached in {len(values)} of {len(seeds)} seeds"
            )
            if len(values) >= 2:
                mean, low, high = t_interval(values)
                row.update(mean=mean, low=low, high=high)
                line += f": mean {mean:.3f}, 90% t-interval [{low:.3f}, {high:.3f}]"
            print(line + f" (per seed {' '.join(f'{v:.3f}' for v in values)})")
            result["ratios"][name][f"{lr:g}"] = row
    return result


if __name__ == "__main__":
    main()
