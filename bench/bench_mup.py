"""muP learning-rate transfer: the best learning rate of a grid at width 64 and at width 256, under muP
and under standard parametrization (SP), on a slice of the King James Bible.

    .venv/bin/python -m bench.bench_mup [--steps 120] [--json out.json]

Every run has the same tokens, depth and other hyper-parameters (matrix_lr = lr, min_lr = lr / 10);
the score is the held-out loss. muP should keep the best lr within one grid step across widths.
"""

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from teleflm.data.sample import kjv_chapters
from teleflm.tune.runs import RunData, at_width, scored_run

CONTEXT, BATCH, VOCAB = 64, 8, 1024
LR_GRID = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
WIDTHS = [64, 256]


def kjv_sequences(n_chars: int = 1_500_000, vocab: int = VOCAB, context: int = CONTEXT) -> np.ndarray:
    """Packed (n, context + 1) token windows of the KJV, with a byte-level BPE trained on the slice."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = "\n\n".join(kjv_chapters())[:n_chars]  # the KJV shipped with teleflm
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        text.splitlines(),
        trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    ids = np.array([i for line in tok.encode_batch(text.splitlines()) for i in line.ids], dtype=np.int64)
    n = len(ids) // (context + 1)
    windows = ids[: n * (context + 1)].reshape(n, context + 1)
    return windows[np.random.default_rng(0).permutation(n)]  # held-out rows come from the whole book


def base_config(steps: int) -> dict:
    """A 2-layer muP model defined against a width-64 proxy."""
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


def run_config(steps: int, width: int, lr: float, parametrization: str) -> dict:
    raw = at_width(base_config(steps), width, head_dim=32)
    raw["mup"].update(lr=lr, matrix_lr=lr, min_lr=lr / 10)
    if parametrization == "SP":
        raw["model"].update(use_mup=False, mup_scale_factor=1.0)
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lrs", default=",".join(map(str, LR_GRID)), help="learning-rate grid")
    parser.add_argument("--json", help="write the curves here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lr_grid = [float(x) for x in args.lrs.split(",")]
    sequences = kjv_sequences()
    heldout = 64
    data = RunData(train=sequences[heldout:], heldout=sequences[:heldout])
    print(
        f"KJV: {len(sequences)} windows of {CONTEXT + 1} tokens (BPE {VOCAB}); {args.steps} steps of {BATCH} windows"
    )
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for p in ("muP", "SP"):
            for width in WIDTHS:
                losses = []
                for lr in lr_grid:
                    t0 = time.perf_counter()
                    r = scored_run(
                        run_config(args.steps, width, lr, p), Path(tmp) / f"{p}-{width}-{lr}", data
                    )
                    losses.append(r["objective"])
                    print(
                        f"{p:>3} width {width:>3} lr {lr:.0e}: held-out loss {r['objective']:.4f} "
                        f"({r['status']}, {time.perf_counter() - t0:.0f}s)",
                        flush=True,
                    )
                curves[f"{p}/{width}"] = losses
    print("\nheld-out loss by learning rate")
    print(f"{'':>10}" + "".join(f"{lr:>9.0e}" for lr in lr_grid) + "   best")
    best = {}
    for key, losses in curves.items():
        i = int(np.argmin([x if math.isfinite(x) else np.inf for x in losses]))
        best[key] = i
        print(f"{key:>10}" + "".join(f"{x:>9.4f}" for x in losses) + f"   {lr_grid[i]:.0e}")
    for p in ("muP", "SP"):
        shift = best[f"{p}/{WIDTHS[-1]}"] - best[f"{p}/{WIDTHS[0]}"]
        print(
            f"{p}: best lr moves {shift:+d} grid step(s) from width {WIDTHS[0]} to {WIDTHS[-1]}"
            f" ({'within one step' if abs(shift) <= 1 else 'more than one step'})"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"lr_grid": lr_grid, "curves": curves, "steps": args.steps}, indent=1)
        )


if __name__ == "__main__":
    main()
