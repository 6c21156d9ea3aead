"""muP learning-rate transfer over width and depth, on a slice of the King James Bible: the best
learning rate of a 2x grid at each width (muP vs standard parametrization) and at each depth
(CompleteP's residual scaling vs width-only muP), for several seeds.

    .venv/bin/python -m bench.bench_mup [--axes width,depth] [--widths 64,128,256,512] \
        [--depths 2,4,8,16] [--seeds 0,1,2] [--steps 100] [--json runs/bench/mup.json]

Every run has the same held-out windows, tokens per step and other hyper-parameters (matrix_lr = lr,
min_lr = lr / 10); a seed sets the init and the order of the training windows. The proxy is width
64, 2 layers: over width the depth stays 2, over depth the width stays 64. The score is the held-out
loss. Per seed and for the seeds' mean, the summary gives the grid's best lr at each size and its
shift in grid steps, and a sub-grid optimum (`optimum_lr`) with its shift. Finished runs are kept in
the JSON file, so a second call only runs what is missing.
"""

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from teleflm.data.sample import kjv_windows
from teleflm.tune.runs import RunData, at_depth, at_width, scored_run

CONTEXT, BATCH, VOCAB = 64, 8, 1024
LR_GRID = [0.025 / 2**k for k in range(8)]  # 2.5e-2 .. 2e-4, a 2x grid
# Per axis: the parametrization under test, then the one it is contrasted with.
PARAMETRIZATIONS = {"width": ("muP", "SP"), "depth": ("CompleteP", "muP")}


def base_config(steps: int) -> dict:
    """A 2-layer muP model defined against a width-64, 2-layer proxy."""
    return {
        "model": dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=CONTEXT,
            use_mup=True,
            mup_scale_factor=1.0,
            output_mult=1.0,
        ),
        "mup": {"std": 0.02, "matrix_std": 0.02},
        "data": {"context_length": CONTEXT},
        "batch": {"global_batch_tokens": CONTEXT * BATCH, "micro_batch_size": BATCH},
        "schedule": {"total_tokens": CONTEXT * BATCH * steps, "warmup_steps": max(1, steps // 10)},
        "parallel": {"mixed_precision": "fp32"},
        "stability": {"action": "stop", "min_loss_jump": 100.0, "min_grad_ratio": 1e6},
    }


def run_config(steps: int, axis: str, value: int, lr: float, parametrization: str, seed: int = 0) -> dict:
    if axis == "width":
        raw = at_width(base_config(steps), value, head_dim=32)
        if parametrization == "SP":
            raw["model"].update(use_mup=False, mup_scale_factor=1.0)
    else:
        raw = at_depth(base_config(steps), value)
        if parametrization == "muP":  # width-only muP: no branch multiplier
            raw["model"]["mup_depth_factor"] = 1.0
    raw["mup"].update(lr=lr, matrix_lr=lr, min_lr=lr / 10)
    raw["seed"] = seed
    return raw


def best_index(losses: list[float]) -> int:
    return int(np.argmin([x if math.isfinite(x) else np.inf for x in losses]))


def optimum_lr(lrs: list[float], losses: list[float]) -> float:
    """The lr at the vertex of the parabola in log(lr) through the grid's best point and its two
    neighbours (the best point itself at an end of the grid or beside a diverged run): between grid
    points, so that noise in a flat basin moves it by a fraction of a step, not a whole one."""
    i = best_index(losses)
    if i == 0 or i == len(lrs) - 1 or not all(math.isfinite(losses[j]) for j in (i - 1, i + 1)):
        return lrs[i]
    x = np.log([lrs[i - 1], lrs[i], lrs[i + 1]])
    a, b, _ = np.polyfit(x, [losses[i - 1], losses[i], losses[i + 1]], 2)
    return float(np.exp(-b / (2 * a)))


def summarize(runs: dict, axis: str, values: list[int], seeds: list[int], lrs: list[float]) -> dict:
    """Per parametrization: for each seed and for the mean over seeds, the best lr's grid index at
    each value and its shift from the first value to the last (+: a lower lr), the sub-grid optimum
    (`optimum_lr`) and its shift in grid steps; for the mean, its best loss at each value."""
    step = float(np.mean(np.abs(np.diff(np.log(lrs)))))

    def curve_summary(curves: list[list[float]]) -> dict:
        best = [best_index(c) for c in curves]
        optimum = [optimum_lr(lrs, c) for c in curves]
        return {
            "best": best,
            "shift": best[-1] - best[0],
            "optimum": optimum,
            "optimum_shift": math.log(optimum[0] / optimum[-1]) / step,
        }

    out = {}
    for p in PARAMETRIZATIONS[axis]:
        losses = np.array(
            [[[runs[f"{axis}/{p}/{v}/{s}/{lr:g}"] for lr in lrs] for v in values] for s in seeds]
        )
        mean = np.where(np.isfinite(losses), losses, np.inf).mean(axis=0)
        out[p] = {
            "seeds": {seed: curve_summary(losses[k].tolist()) for k, seed in enumerate(seeds)},
            "mean": curve_summary(mean.tolist()) | {"best_loss": mean.min(axis=1).tolist()},
        }
    return out


def plot(runs: dict, axis: str, values: list[int], seeds: list[int], lrs: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = PARAMETRIZATIONS[axis]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), sharey=True)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(values)))
    for ax, p in zip(axes, names, strict=True):
        for color, v in zip(colors, values, strict=True):
            losses = np.array([[runs[f"{axis}/{p}/{v}/{s}/{lr:g}"] for lr in lrs] for s in seeds])
            losses[~np.isfinite(losses)] = np.nan
            mean = np.nanmean(losses, axis=0)
            ax.plot(lrs, mean, "-", color=color, label=f"{axis} {v}")
            ax.fill_between(lrs, np.nanmin(losses, axis=0), np.nanmax(losses, axis=0), color=color, alpha=0.2)
            for row in losses:  # each seed's best lr
                i = best_index(list(np.nan_to_num(row, nan=np.inf)))
                ax.plot([lrs[i]], [row[i]], "v", color=color, ms=5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate (lr = matrix_lr)")
        ax.set_title(f"{p}: best lr per seed (v), mean and range over {len(seeds)} seeds", fontsize=8)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out loss (nats/token)")
    finite = [x for x in runs.values() if math.isfinite(x)]
    axes[0].set_ylim(min(finite) - 0.05, min(finite) + 1.0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--axes", default="width,depth")
    parser.add_argument("--widths", default="64,128,256,512")
    parser.add_argument("--depths", default="2,4,8,16")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lrs", default=",".join(f"{x:g}" for x in LR_GRID), help="learning-rate grid")
    parser.add_argument(
        "--json", type=Path, help="finished runs (read back on a second call) and the summary"
    )
    parser.add_argument("--plots", type=Path, default=Path("runs/bench"), help="mup_<axis>.png go here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lrs = sorted((float(x) for x in args.lrs.split(",")), reverse=True)  # grid index up: lr down
    seeds = [int(s) for s in args.seeds.split(",")]
    values = {
        "width": [int(v) for v in args.widths.split(",")],
        "depth": [int(v) for v in args.depths.split(",")],
    }
    saved = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    if saved.get("steps", args.steps) != args.steps:
        raise SystemExit(f"{args.json} holds runs of {saved['steps']} steps, not {args.steps}")
    runs = saved.get("runs", {})
    sequences = kjv_windows(vocab_size=VOCAB, context=CONTEXT)
    heldout = sequences[:64]
    print(
        f"KJV: {len(sequences)} windows of {CONTEXT + 1} tokens (BPE {VOCAB}); {args.steps} steps of {BATCH} "
        f"windows; lr grid {[f'{x:.3g}' for x in lrs]}; seeds {seeds}"
    )
    summary = saved.get("summary", {})
    with tempfile.TemporaryDirectory() as tmp:
        for axis in args.axes.split(","):
            for seed in seeds:
                order = np.random.default_rng(seed).permutation(len(sequences) - 64)
                data = RunData(train=sequences[64:][order], heldout=heldout)
                for p in PARAMETRIZATIONS[axis]:
                    for v in values[axis]:
                        for lr in lrs:
                            key = f"{axis}/{p}/{v}/{seed}/{lr:g}"
                            if key in runs:
                                continue
                            t0 = time.perf_counter()
                            raw = run_config(args.steps, axis, v, lr, p, seed)
                            r = scored_run(raw, Path(tmp) / "run", data)
                            runs[key] = r["objective"]
                            print(
                                f"{key}: held-out loss {r['objective']:.4f} ({r['status']}, "
                                f"{time.perf_counter() - t0:.0f}s)",
                                flush=True,
                            )
                            if args.json:
                                state = {"runs": runs, "summary": summary, "steps": args.steps}
                                args.json.write_text(json.dumps(state, indent=0))
            summary[axis] = summarize(runs, axis, values[axis], seeds, lrs)
            plot(runs, axis, values[axis], seeds, lrs, args.plots / f"mup_{axis}.png")
            print(
                f"\nover {axis} {values[axis]}: the best lr of the grid per {axis} and its shift in grid steps "
                "(+: lower), then the sub-grid optimum and its shift"
            )
            for p, found in summary[axis].items():
                for seed, s in [*found["seeds"].items(), ("mean", found["mean"])]:
                    best = " ".join(f"{lrs[i]:.3g}" for i in s["best"])
                    optimum = " ".join(f"{x:.3g}" for x in s["optimum"])
                    print(
                        f"  {p:>9} seed {seed:>4}: grid {best}  shift {s['shift']:+d}; "
                        f"optimum {optimum}  shift {s['optimum_shift']:+.2f}"
                    )
                shifts = [abs(s["shift"]) for s in found["seeds"].values()]
                optimum_shifts = [f"{abs(s['optimum_shift']):.2f}" for s in found["seeds"].values()]
                best_loss = " ".join(f"{x:.4f}" for x in found["mean"]["best_loss"])
                print(
                    f"  {p:>9}: |shift| per seed {shifts} (sub-grid {optimum_shifts}); "
                    f"best mean loss per {axis} {best_loss}"
                )
            print(f"plot: {args.plots / f'mup_{axis}.png'}")
    if args.json:
        state = {"runs": runs, "summary": summary, "lrs": lrs, "steps": args.steps}
        args.json.write_text(json.dumps(state, indent=0))


if __name__ == "__main__":
    main()
