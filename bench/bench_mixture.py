"""Memory per rank of the mixture stream against the corpus size: a synthetic domain of `--docs`
documents, the stream opened, resumed near the end of its first epoch (a walk over every document's
length) and read into the second epoch, as a rank of `--dp` would.

    .venv/bin/python -m bench.bench_mixture [--docs 10000000] [--mean-tokens 8] [--dp 112]

Reported: the peak of Python and numpy allocations (tracemalloc) and the process's anonymous resident
memory; the shards themselves are memory-mapped files (page cache, not the process's own memory).
"""

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

from teleflm.data.mixture import DomainWeight, MixtureStream
from teleflm.data.synthetic import write_synthetic_shards

CONTEXT = 4096


def rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=10_000_000)
    parser.add_argument("--mean-tokens", type=int, default=8)
    parser.add_argument("--dp", type=int, default=112)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        shards = write_synthetic_shards(Path(tmp) / "shards", {"web": args.docs}, args.mean_tokens)
        written = time.perf_counter() - t0
        rss_before = rss_anon_mb()
        tracemalloc.start()
        t0 = time.perf_counter()
        stream = MixtureStream(
            shards, [DomainWeight("web", 1.0, 2.0)], CONTEXT, seed=0, dp_rank=args.dp - 1, dp_size=args.dp
        )
        near_end = max(stream.domains[0].epoch_tokens // CONTEXT - 2 * args.dp, 0) // args.dp * args.dp
        stream.load_state_dict({"drawn": near_end, "per_domain": [near_end]})  # no cursors: walk there
        stream.next_sequences(4)  # into the second epoch
        stream.state_dict()
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        rss = rss_anon_mb() - rss_before
    print(
        f"documents            {args.docs:,} ({shards.n_tokens('web'):,} tokens; shards written in {written:.1f} s)"
    )
    print(f"open + resume + read {seconds:.2f} s (walks every document's length once)")
    print(f"peak allocations     {peak:.1f} MiB (tracemalloc)")
    print(f"anonymous RSS growth {rss:.1f} MiB")


if __name__ == "__main__":
    main()
