"""muScaling on a tiny ladder, several seeds per rung: train muP widths with the same hyper-parameters
and tokens on a slice of the King James Bible, fit L(N) = a*N^b + c to all but the two largest and
predict those (error and whether each lies inside its interval), and forecast width 512.

    .venv/bin/python -m bench.bench_predict [--steps 600] [--lr 3e-3] [--widths 32,48,64,96,128,192] \
        [--seeds 3] [--out runs/bench/predict]

The ladder is `teleflm predict`'s own (teleflm.scaling.ladder): each seed moves the init and the
order of the training windows; the held-out loss is over the first 10% of the windows. Finished runs
are read back from `--out` on a second call.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_mup import CONTEXT, VOCAB, base_config
from teleflm.data.sample import kjv_windows
from teleflm.scaling.fit import FitError
from teleflm.scaling.ladder import LadderSpec, describe, forecast, run_ladder, write_report
from teleflm.tune.runs import at_width, parameter_count, training_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--widths", default="32,48,64,96,128,192")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/predict"), help="runs and report")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "sequences.npy", kjv_windows(vocab_size=VOCAB, context=CONTEXT))
    base = base_config(args.steps)
    base["mup"].update(lr=args.lr, matrix_lr=args.lr, min_lr=args.lr / 10)
    spec = LadderSpec(
        base=base,
        widths=[int(w) for w in args.widths.split(",")],
        out=args.out,
        seeds=args.seeds,
        sequences=args.out / "sequences.npy",
        head_dim=16,
    )
    t0 = time.perf_counter()
    rungs = run_ladder(spec)
    print(f"ladder: {len(rungs)} rungs x {args.seeds} seeds in {time.perf_counter() - t0:.0f}s")
    for r in rungs:
        print(
            f"width {r.width:>3}: N = {r.params:>9,.0f} non-embedding, held-out loss {r.loss:.4f} "
            f"(seeds {' '.join(f'{x:.4f}' for x in r.losses)}, sd {np.std(r.losses, ddof=1) if len(r.losses) > 1 else 0:.4f})"
        )
    target = at_width(base, 512, head_dim=16)
    try:
        result = forecast(
            rungs,
            float(parameter_count(target["model"])),
            "width 512",
            "held-out loss (nats per token)",
            training_flops(target),
        )
    except FitError as e:  # e.g. a few steps only (the smoke run), where the loss need not fall
        print(f"no prediction: {e}")
        return
    print(describe(result))
    for error, inside in zip(result.held_out_errors(), result.held_out_inside(), strict=True):
        where = {True: "inside", False: "outside", None: "no"}[inside]
        print(
            f"held-out: error {error:+.2%} ({'within' if abs(error) <= 0.01 else 'outside'} 1%), {where} its interval"
        )
    print(f"report: {write_report(result, args.out, 'bench_predict', 'non-embedding')}")


if __name__ == "__main__":
    main()
