"""muScaling on a tiny ladder: train 5 muP widths with the same hyper-parameters and tokens on a slice
of the King James Bible, fit L(N) = a*N^b + c on the 4 smallest and predict the largest.

    .venv/bin/python -m bench.bench_predict [--steps 300] [--lr 3e-3] [--widths 32,48,64,96,128]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_mup import base_config, kjv_sequences
from teleflm.scaling.fit import FitError
from teleflm.scaling.ladder import Rung, forecast, interval_text, write_report
from teleflm.tune.runs import RunData, at_width, parameter_count, scored_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--widths", default="32,48,64,96,128")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--report", default="runs/bench/predict", help="Markdown + PNG report folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    widths = [int(w) for w in args.widths.split(",")]
    sequences = kjv_sequences()
    data = RunData(train=sequences[64:], heldout=sequences[:64])
    rungs = []
    with tempfile.TemporaryDirectory() as tmp:
        for width in widths:
            raw = at_width(base_config(args.steps), width, head_dim=16)
            raw["mup"].update(lr=args.lr, matrix_lr=args.lr, min_lr=args.lr / 10)
            t0 = time.perf_counter()
            r = scored_run(raw, Path(tmp) / f"w{width}", data)
            n = parameter_count(raw["model"])
            rungs.append(Rung(float(n), r["objective"], width))
            print(
                f"width {width:>3}: N = {n:>9,} non-embedding, held-out loss {r['objective']:.4f} "
                f"({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    target = parameter_count(at_width(base_config(args.steps), 512, head_dim=16)["model"])
    try:
        result = forecast(rungs, float(target), "width 512", "held-out loss (nats per token)")
    except FitError as e:
        print(f"no prediction: {e}")
        return
    h = result.held_out
    print(
        f"fit on all rungs: L = {result.target.law.a:.4g} N^{result.target.law.b:.4f} + {result.target.law.c:.4f}"
    )
    print(
        f"held-out largest rung (width {widths[-1]}): predicted {h.loss:.4f} ({interval_text(h)}), "
        f"measured {rungs[-1].loss:.4f}, error {result.held_out_error:+.2%} "
        f"({'within' if abs(result.held_out_error) <= 0.02 else 'outside'} 2%)"
    )
    print(f"forecast width 512 (N = {target:,}): {result.target.loss:.4f} ({interval_text(result.target)})")
    print(f"report: {write_report(result, Path(args.report), 'bench_predict', 'non-embedding')}")


if __name__ == "__main__":
    main()
