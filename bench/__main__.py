"""`python -m bench [NAME ...] [--json FILE] [--smoke]`: run the benchmarks (all by default), each
printing its table; the machine's description comes first. Not part of the test suite, which runs
`--smoke` only (tests/bench)."""

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

BENCHMARKS = [
    "bench_train",
    "bench_loss",
    "bench_attention",
    "bench_generate",
    "bench_serve",
    "bench_data",
    "bench_mixture",
    "bench_export",
    "bench_mup",
    "bench_predict",
    "bench_grow",
    "bench_distributed",
]
# `--smoke`: each benchmark at its smallest size, a few steps: proves the code runs, measures nothing.
SMOKE_ARGS = {
    "bench_train": ["--sizes", "1M", "--modes", "eager", "--steps", "2", "--rounds", "1"],
    "bench_loss": ["--tokens", "64", "--vocab", "1024", "--repeats", "1"],
    "bench_attention": ["--lengths", "128", "--docs", "4", "--repeats", "1"],
    "bench_generate": ["--prompt", "8", "--new", "2"],
    "bench_serve": ["--requests", "2", "--max-tokens", "2"],
    "bench_data": ["--mb", "0.05", "--vocab", "512", "--repeats", "1"],
    "bench_mixture": ["--docs", "100000"],
    "bench_export": ["--layers", "1", "--vocab", "1024", "--repeats", "1"],
    "bench_mup": [
        "--steps",
        "2",
        "--lrs",
        "0.01,0.02",
        "--seeds",
        "0",
        "--widths",
        "64,128",
        "--depths",
        "2,4",
    ],
    "bench_predict": [
        "--steps",
        "2",
        "--widths",
        "32,48,64,96,128",
        "--seeds",
        "2",
        "--out",
        "runs/bench/smoke/predict",
    ],
    "bench_grow": ["--steps", "4", "--seeds", "0,1", "--runs", "msg,stack", "--lrs", "1e-2,2e-2"],
    "bench_distributed": ["--steps", "2", "--layouts", "1,fsdp2"],
}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help=f"default: all of {BENCHMARKS}")
    parser.add_argument("--json", help="write {name: seconds, exit code} here")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes, a few steps: a code check")
    args = parser.parse_args()
    names = args.names or [n for n in BENCHMARKS if importlib.util.find_spec(f"bench.{n}")]
    print(f"machine: {machine()}\n")
    results = {}
    for name in names:
        print(f"=== {name}", flush=True)
        started = time.time()
        extra = SMOKE_ARGS.get(name, []) if args.smoke else []
        code = subprocess.call([sys.executable, "-m", f"bench.{name}", *extra])
        results[name] = {"seconds": round(time.time() - started, 1), "exit": code}
        print(f"({name}: {results[name]['seconds']} s, exit {code})\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "benchmarks": results}, f, indent=1)
    failed = [name for name, r in results.items() if r["exit"]]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
