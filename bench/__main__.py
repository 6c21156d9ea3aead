"""`python -m bench [NAME ...] [--json FILE]`: run the benchmarks (all by default), each printing its
table; the machine's description comes first. Not part of the test suite."""

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
    "bench_generate",
    "bench_serve",
    "bench_data",
    "bench_export",
    "bench_mup",
    "bench_predict",
    "bench_grow",
]


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
    args = parser.parse_args()
    names = args.names or [n for n in BENCHMARKS if importlib.util.find_spec(f"bench.{n}")]
    print(f"machine: {machine()}\n")
    results = {}
    for name in names:
        print(f"=== {name}", flush=True)
        started = time.time()
        code = subprocess.call([sys.executable, "-m", f"bench.{name}"])
        results[name] = {"seconds": round(time.time() - started, 1), "exit": code}
        print(f"({name}: {results[name]['seconds']} s, exit {code})\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "benchmarks": results}, f, indent=1)


if __name__ == "__main__":
    main()
