"""Data pipeline speed on this machine, every figure measured in the same run:

- `teleflm data prepare` in MB/s of raw text with 1 and 2 job workers (local processes, the cores
  shared among them), tokenizing only, against `tokenizers`' `encode_batch_fast` (every core) on
  the same documents in memory, at its best of one call for all and batches of 1,024 and 256
  documents, and against that one call with its ids read into an array (prepare's
  `encode_documents`: the bare call leaves them in Rust), timed back to back in each of `--repeats`
  rounds (the ratio is the median of the rounds' ratios: the machine's load drifts between minutes);
- the same with exact and near-duplicate removal (`[dedup]`): dedup throughput in documents/s (its
  scan and decision stages, wall clock), and near-dedup's false positives on this real text (removed
  documents whose true 5-gram Jaccard similarity to the document that removed them is under 0.5);
- the projected days for Tele-FLM's 6.7 TB on 100 machines like this one, from the measured rate
  (a projection: it assumes the parts spread evenly and machines add up, as the workers share nothing
  but the file system);
- the loader's time per training batch against a tiny model's training step.

    .venv/bin/python -m bench.bench_data [--mb 8] [--vocab 8192] [--json out.json]
    .venv/bin/python -m bench.bench_data --memory-gb 3 [--limit-gb 1]   # a corpus larger than the limit

Text: the KJV and People's Daily from ../shared/corpora when present (else the embedded sample), and
Python standard library sources for code.
"""

import argparse
import contextlib
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

from teleflm.data import sample
from teleflm.data.dedup import shingle_jaccard
from teleflm.data.mixture import DomainWeight, MixtureStream
from teleflm.data.prepare import (
    JOB,
    encode_documents,
    load_data_config,
    prepare,
    removals,
    resolve_inputs,
    stage_progress,
)
from teleflm.data.shards import open_shards, token_dtype
from teleflm.data.sources import read_documents
from teleflm.data.synthetic import write_synthetic_corpus
from teleflm.data.tokenizer import raw_tokenizer, train_tokenizer

CORPORA = Path(__file__).resolve().parents[1].parent / "shared" / "corpora"
CONTEXT, BATCH = 256, 8
REFERENCE_BATCHES = (0, 1024, 256)  # documents per encode_batch_fast call (0: all in one)
CARD_BYTES, MACHINES = 6.7e12, 100  # Tele-FLM's raw text; the cluster of the projection
DOMAINS = (
    '[[domains]]\nname = "en"\ninputs = ["en.txt"]\ndoc_split = "line"\nproportion = 0.5\n'
    '[[domains]]\nname = "zh"\ninputs = ["zh.txt"]\ndoc_split = "line"\nproportion = 0.25\n'
    '[[domains]]\nname = "code"\ninputs = ["code.jsonl"]\nproportion = 0.25\n'
)


def write_corpus(folder: Path, megabytes: float) -> tuple[Path, Path]:
    """About `megabytes` of English, Chinese and code as three domains; returns two data configs of
    it: tokenizing only, and with exact and near dedup. Parts of a quarter of a domain each, so
    that two workers have work to share."""
    per_domain = int(megabytes * 1e6 / 3)
    kjv, news = CORPORA / "en_book_kjv.txt", CORPORA / "zh_news_peoplesdaily1998.txt"
    english = kjv.read_text() if kjv.exists() else "\n\n".join(sample.kjv_chapters())
    chinese = news.read_text() if news.exists() else "\n\n".join(sample.poems())
    code = sample.stdlib_sources()
    (folder / "en.txt").write_text(english.encode()[:per_domain].decode(errors="ignore"))
    (folder / "zh.txt").write_text(chinese.encode()[:per_domain].decode(errors="ignore"))
    with (folder / "code.jsonl").open("w") as f:
        size = 0
        for text in code:
            f.write(json.dumps({"text": text}) + "\n")
            size += len(text.encode())
            if size >= per_domain:
                break
    top = f'tokenizer = "tok"\nout = "shards"\nheldout_fraction = 0.01\npart_bytes = {max(per_domain // 4, 1)}\n'
    (folder / "data.toml").write_text(top + DOMAINS)
    (folder / "dedup.toml").write_text(top + "[dedup]\nexact = true\nnear = true\n" + DOMAINS)
    return folder / "data.toml", folder / "dedup.toml"


def documents(config_path: Path) -> list[str]:
    cfg = load_data_config(config_path)
    return [
        doc
        for d in cfg.domains
        for f in resolve_inputs(d.inputs, config_path.parent, d.name)
        for doc in read_documents(f, d.text_field, d.doc_split)
    ]


def encode_in_batches(encoder, docs: list[str], size: int) -> None:
    """`encode_batch_fast` over `docs` in batches of `size` documents (0: one call for all)."""
    size = size or len(docs)
    for i in range(0, len(docs), size):
        encoder.encode_batch_fast(docs[i : i + size], add_special_tokens=False)


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def tiny_step_seconds(vocab: int, steps: int = 5) -> float:
    """One fp32 training step (forward, backward, AdamW) of a tiny model (width 256, 4 layers) on 8 x 256."""
    import torch

    from teleflm.model import TeleFLMConfig, TeleFLMForCausalLM

    config = TeleFLMConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
    )
    model = TeleFLMForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, vocab, (BATCH, CONTEXT + 1))

    def step():
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up
    return best_of(steps, step)


def near_dedup_false_positives(job: Path, documents: int) -> dict:
    """Near-duplicate removals of a finished job, and those whose true shingle similarity to the
    document that removed them is under 0.5 (false positives) or under the LSH threshold."""
    near = [(r, k) for r, k, kind in removals(job) if kind == "near"]
    similarity = [shingle_jaccard(r, k) for r, k in near]
    false = sum(s < 0.5 for s in similarity)
    return {
        "near_removed": len(near),
        "near_below_0.8": sum(s < 0.8 for s in similarity),
        "near_false_positives": false,
        "near_false_positive_rate": false / max(documents, 1),
    }


UNDER_LIMIT = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import teleflm.data.prepare as prepare

    def vm():
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))

    folder, chunk, headroom, limit = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    prepare.CHUNK_CHARS = chunk
    prepare.prepare(folder / "warm.toml", progress=False, workers=1)  # every import and lazy load, once
    warm = vm()
    limit = limit or warm + headroom
    if limit <= warm:
        sys.exit(f"the limit ({limit / 2**30:.2f} GiB) is below what the warm worker holds ({warm / 2**30:.2f} GiB)")
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    manifest = prepare.prepare(folder / "data.toml", progress=False, workers=1)
    train = manifest["domains"]["web"]["splits"]["train"]
    print(json.dumps({"warm": warm, "limit": limit, "documents": train["documents"], "bytes": train["bytes"]}))
    """)


def write_memory_job(folder: Path, tokenizer_dir: Path, name: str, inputs: str) -> None:
    """A one-domain job (filters and dedup on) over the JSONL files `inputs` of `folder`."""
    (folder / f"{name}.toml").write_text(
        f'tokenizer = "{tokenizer_dir}"\nout = "{name}-shards"\nheldout_fraction = 0.01\npart_bytes = 8000000\n'
        f'[[domains]]\nname = "web"\ninputs = ["{inputs}"]\n[domains.filters]\nmin_words = 10\n'
        "max_duplicate_ngram_fraction = { 5 = 0.15 }\n[dedup]\nexact = true\nnear = true\n"
    )


def run_under_limit(
    folder: Path, tokenizer_dir: Path, chunk_chars: int, headroom: int = 0, limit: int = 0
) -> dict:
    """Prepare folder's web-*.jsonl (one job worker, one encoding process) in a subprocess whose
    address space is limited to `limit` bytes, or to `headroom` bytes past what it holds once warm (a
    first small job run); returns the limit and what it wrote. Raises with the subprocess's error
    when it fails."""
    (folder / "warm.jsonl").write_text(
        "".join(json.dumps({"text": f"warm-up document {i} " * 20}) + "\n" for i in range(50))
    )
    write_memory_job(folder, tokenizer_dir, "warm", "warm.jsonl")
    write_memory_job(folder, tokenizer_dir, "data", "web-*.jsonl")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
    result = subprocess.run(
        [sys.executable, "-c", UNDER_LIMIT, str(folder), str(chunk_chars), str(headroom), str(limit)],
        capture_output=True,
        text=True,
        env=env,
    )
    if result.returncode != 0:
        raise RuntimeError(f"prepare under a memory limit failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_run(gigabytes: float, limit_gb: float, vocab: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = max(1, round(gigabytes * 4))
        for i in range(files):
            write_synthetic_corpus(folder / f"web-{i}.jsonl", gigabytes * 1000 / files, seed=i)
        corpus = sum(p.stat().st_size for p in folder.glob("web-*.jsonl"))
        with (folder / "web-0.jsonl").open() as f:
            texts = [json.loads(line)["text"] for line in itertools.islice(f, 20_000)]
        train_tokenizer(iter(texts), vocab, folder / "tok")
        started = time.perf_counter()
        figures = run_under_limit(folder, folder / "tok", 1 << 20, limit=int(limit_gb * 2**30))
        seconds = time.perf_counter() - started
    print(
        f"{corpus / 1e9:.2f} GB corpus prepared (filters, dedup, encode) under an address-space limit of "
        f"{limit_gb:g} GiB (the warm worker holds {figures['warm'] / 2**30:.2f} GiB): {figures['documents']:,} documents, "
        f"{figures['bytes'] / 1e9:.2f} GB kept, {seconds / 60:.1f} min"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=8.0, help="megabytes of raw text to prepare")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5, help="paired timings of the tokenizing runs")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--memory-gb",
        type=float,
        default=0,
        help="instead: prepare a synthetic corpus this large under a limit",
    )
    parser.add_argument(
        "--limit-gb", type=float, default=1.0, help="with --memory-gb: the worker's address-space limit, GiB"
    )
    args = parser.parse_args()
    if args.memory_gb:
        memory_run(args.memory_gb, args.limit_gb, args.vocab)
        return

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        plain, with_dedup = write_corpus(folder, args.mb)
        docs = documents(plain)
        n_bytes = sum(len(d.encode()) for d in docs)
        train_tokenizer(iter(docs[:: max(1, len(docs) // 20_000)]), args.vocab, folder / "tok")
        encoder = raw_tokenizer(folder / "tok")
        print(
            f"{n_bytes / 1e6:.1f} MB of raw text, {len(docs):,} documents, vocabulary {args.vocab}, {cores} cores"
        )

        runs = itertools.count()
        figures = {"raw_mb": n_bytes / 1e6, "documents": len(docs), "cores": cores}

        def pipeline(config: Path, jobs: int) -> tuple[float, Path]:
            """Wall-clock seconds of one prepare with `jobs` workers, and its shards."""
            out = folder / f"shards{next(runs)}"
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # prepare's per-domain lines
                prepare(config, out=out, progress=False, jobs=jobs)
            return time.perf_counter() - started, out

        # Tokenizing: each repeat times the references and then each prepare, back to back, so that
        # each ratio compares runs under the same load; the figures are the medians over repeats.
        # The reference is the library on every core at its best batch size in that round.
        encoder.encode_batch_fast(docs[:1000], add_special_tokens=False)  # its threads start
        # Beside it, one call with its ids read out into an array (prepare's `encode_documents`): the
        # least any use of the tokens pays, since the bare call leaves them in Rust.
        batch_seconds = {size: [] for size in REFERENCE_BATCHES}
        with_ids_seconds = []
        ratios, ratios_one_call, ratios_with_ids = {1: [], 2: []}, {1: [], 2: []}, {1: [], 2: []}
        prepare_seconds = {1: [], 2: []}
        dtype = token_dtype(encoder.get_vocab_size())
        for _ in range(args.repeats):
            for size in REFERENCE_BATCHES:
                batch_seconds[size].append(
                    best_of(1, lambda size=size: encode_in_batches(encoder, docs, size))
                )
            with_ids_seconds.append(best_of(1, lambda: encode_documents(encoder, docs, dtype)))
            reference = min(times[-1] for times in batch_seconds.values())
            for jobs in (1, 2):
                prepare_seconds[jobs].append(pipeline(plain, jobs)[0])
                ratios[jobs].append(reference / prepare_seconds[jobs][-1])
                ratios_one_call[jobs].append(batch_seconds[0][-1] / prepare_seconds[jobs][-1])
                ratios_with_ids[jobs].append(with_ids_seconds[-1] / prepare_seconds[jobs][-1])
        for size, times in batch_seconds.items():
            figures[f"encode_batch_fast_{size or 'all'}_mb_s"] = n_bytes / statistics.median(times) / 1e6
        figures["encode_with_ids_mb_s"] = n_bytes / statistics.median(with_ids_seconds) / 1e6
        figures["ids_share_of_one_call"] = statistics.median(
            (w - b) / b for w, b in zip(with_ids_seconds, batch_seconds[0], strict=True)
        )
        figures["encode_batch_fast_mb_s"] = max(
            figures[f"encode_batch_fast_{size or 'all'}_mb_s"] for size in REFERENCE_BATCHES
        )
        for jobs in (1, 2):
            figures[f"prepare_{jobs}_workers_mb_s"] = n_bytes / statistics.median(prepare_seconds[jobs]) / 1e6
            figures[f"prepare_{jobs}_workers_ratio"] = statistics.median(ratios[jobs])
            figures[f"prepare_{jobs}_workers_ratios"] = [round(r, 3) for r in ratios[jobs]]
            figures[f"prepare_{jobs}_workers_ratio_one_call"] = statistics.median(ratios_one_call[jobs])
            figures[f"prepare_{jobs}_workers_ratio_with_ids"] = statistics.median(ratios_with_ids[jobs])
        for jobs in (1, 2):
            seconds, out = min(pipeline(with_dedup, jobs) for _ in range(min(2, args.repeats)))
            job = out / JOB
            scan, decide = stage_progress(job, "scan"), stage_progress(job, "dedup")
            manifest = json.loads((out / "manifest.json").read_text())
            figures[f"dedup_prepare_{jobs}_workers_mb_s"] = n_bytes / seconds / 1e6
            figures[f"dedup_{jobs}_workers_docs_s"] = scan["documents"] / (
                scan["seconds"] + decide["seconds"]
            )
        figures["dedup_removed"] = manifest["dedup"]["removed"]
        figures |= near_dedup_false_positives(job, len(docs))
        best = max(figures["dedup_prepare_1_workers_mb_s"], figures["dedup_prepare_2_workers_mb_s"])
        figures["projected_days_one_machine"] = CARD_BYTES / (best * 1e6) / 86400
        figures["projected_days_100_machines"] = figures["projected_days_one_machine"] / MACHINES

        shards = open_shards(folder / "shards0")
        mixture = [DomainWeight("en", 0.5), DomainWeight("zh", 0.25), DomainWeight("code", 0.25)]
        stream = MixtureStream(shards, mixture, context_length=CONTEXT, seed=0, document_mask=True)
        stream.next_sequences(BATCH)  # first touch of the memory maps
        calls = 200
        with warnings.catch_warnings():  # a small corpus is repeated past its epochs: expected here
            warnings.simplefilter("ignore")
            loader = (
                best_of(args.repeats, lambda: [stream.next_sequences(BATCH) for _ in range(calls)]) / calls
            )
        figures["loader_ms_per_batch"] = loader * 1e3
    step = tiny_step_seconds(args.vocab)
    figures["tiny_step_ms"] = step * 1e3
    figures["loader_share_of_step"] = loader / step

    fast = figures["encode_batch_fast_mb_s"]
    for size in REFERENCE_BATCHES:
        rate = figures[f"encode_batch_fast_{size or 'all'}_mb_s"]
        batch = f"batches of {size}" if size else "one call"
        print(
            f"tokenizers encode_batch_fast ({cores} cores), {batch:15s} {rate:7.2f} MB/s (median of {args.repeats})"
        )
    print(
        f"tokenizers encode_batch_fast ({cores} cores), one call, ids read into an array "
        f"{figures['encode_with_ids_mb_s']:7.2f} MB/s (reading them out: +{figures['ids_share_of_one_call']:.0%} "
        "of the call's time)"
    )
    for jobs in (1, 2):
        rate, ratios = figures[f"prepare_{jobs}_workers_mb_s"], figures[f"prepare_{jobs}_workers_ratios"]
        print(
            f"data prepare, {jobs} worker(s), tokenize         {rate:7.2f} MB/s = "
            f"{figures[f'prepare_{jobs}_workers_ratio']:.2f}x encode_batch_fast at its best batch size (median "
            f"of paired ratios {', '.join(f'{r:.2f}' for r in ratios)}); "
            f"{figures[f'prepare_{jobs}_workers_ratio_one_call']:.2f}x one call over all documents, "
            f"{figures[f'prepare_{jobs}_workers_ratio_with_ids']:.2f}x that call with its ids read out"
        )
    for jobs in (1, 2):
        rate = figures[f"dedup_prepare_{jobs}_workers_mb_s"]
        print(
            f"data prepare, {jobs} worker(s), dedup + tokenize {rate:7.2f} MB/s = {rate / fast:.2f}x encode_batch_fast"
        )
    print(
        f"dedup (exact + near: scan and decision)  {figures['dedup_1_workers_docs_s']:,.0f} documents/s with 1 worker, "
        f"{figures['dedup_2_workers_docs_s']:,.0f} with 2; removed {figures['dedup_removed']}"
    )
    print(
        f"near-dedup on this text: {figures['near_removed']} removed, {figures['near_below_0.8']} below the 0.8 "
        f"threshold, {figures['near_false_positives']} false positives (5-gram Jaccard < 0.5): a rate of "
        f"{figures['near_false_positive_rate']:.4%} of {len(docs):,} documents"
    )
    print(
        f"projection: {CARD_BYTES / 1e12:.1f} TB at {best:.2f} MB/s per machine (dedup + tokenize): "
        f"{figures['projected_days_one_machine']:.1f} days on one, {figures['projected_days_100_machines']:.2f} days "
        f"on {MACHINES} such machines"
    )
    print(
        f"loader, {BATCH} x {CONTEXT} with document mask  {figures['loader_ms_per_batch']:7.3f} ms per batch "
        f"= {100 * figures['loader_share_of_step']:.2f}% of a tiny model's step ({figures['tiny_step_ms']:.0f} ms; target < 2%)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
