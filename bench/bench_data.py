"""Data pipeline speed: `teleflm data prepare` (read, tokenize, decontaminate-free, write shards) in MB/s
of raw text with every core, against the raw `tokenizers` batch encoders on the same documents in the
same run; and the loader's time per training batch against a tiny model's training step.

    .venv/bin/python -m bench.bench_data [--mb 8] [--vocab 8192] [--json out.json]

Text: the KJV and People's Daily from ../shared/corpora when present (else the embedded sample), and
Python standard library sources for code.
"""

import argparse
import contextlib
import io
import itertools
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

from teleflm.data import sample
from teleflm.data.mixture import DomainWeight, MixtureStream
from teleflm.data.prepare import load_data_config, prepare, resolve_inputs
from teleflm.data.shards import open_shards
from teleflm.data.sources import read_documents
from teleflm.data.tokenizer import raw_tokenizer, train_tokenizer

CORPORA = Path(__file__).resolve().parents[1].parent / "shared" / "corpora"
CONTEXT, BATCH = 256, 8


def write_corpus(folder: Path, megabytes: float) -> Path:
    """About `megabytes` of English, Chinese and code as three domains; returns the data.toml."""
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
    (folder / "data.toml").write_text(
        'tokenizer = "tok"\nout = "shards"\nheldout_fraction = 0.01\n'
        '[[domains]]\nname = "en"\ninputs = ["en.txt"]\ndoc_split = "line"\nproportion = 0.5\n'
        '[[domains]]\nname = "zh"\ninputs = ["zh.txt"]\ndoc_split = "line"\nproportion = 0.25\n'
        '[[domains]]\nname = "code"\ninputs = ["code.jsonl"]\nproportion = 0.25\n'
    )
    return folder / "data.toml"


def documents(config_path: Path) -> list[str]:
    cfg = load_data_config(config_path)
    return [
        doc
        for d in cfg.domains
        for f in resolve_inputs(d.inputs, config_path.parent, d.name)
        for doc in read_documents(f, d.text_field, d.doc_split)
    ]


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def tiny_step_seconds(vocab: int, steps: int = 5) -> float:
    """One fp32 training step (forward, backward, AdamW) of the demo-sized model on a batch of 8 x 256."""
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=8.0, help="megabytes of raw text to prepare")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config_path = write_corpus(folder, args.mb)
        docs = documents(config_path)
        n_bytes = sum(len(d.encode()) for d in docs)
        train_tokenizer(iter(docs[:: max(1, len(docs) // 20_000)]), args.vocab, folder / "tok")
        encoder = raw_tokenizer(folder / "tok")
        print(
            f"{n_bytes / 1e6:.1f} MB of raw text, {len(docs):,} documents, vocabulary {args.vocab}, {os.cpu_count()} cores"
        )

        encode = best_of(args.repeats, lambda: encoder.encode_batch(docs, add_special_tokens=False))
        encode_fast = best_of(args.repeats, lambda: encoder.encode_batch_fast(docs, add_special_tokens=False))
        runs = itertools.count()

        def pipeline(workers: int = 0) -> float:
            with contextlib.redirect_stdout(io.StringIO()):  # prepare's per-domain lines
                return best_of(
                    args.repeats,
                    lambda: prepare(
                        config_path, out=folder / f"shards{next(runs)}", progress=False, workers=workers
                    ),
                )

        figures = {
            "raw_mb": n_bytes / 1e6,
            "encode_batch_mb_s": n_bytes / encode / 1e6,
            "encode_batch_fast_mb_s": n_bytes / encode_fast / 1e6,
            "prepare_mb_s": n_bytes / pipeline() / 1e6,
            "prepare_1_worker_mb_s": n_bytes / pipeline(workers=1) / 1e6,
        }
        figures["prepare_vs_encode_batch"] = figures["prepare_mb_s"] / figures["encode_batch_mb_s"]
        figures["prepare_vs_encode_batch_fast"] = figures["prepare_mb_s"] / figures["encode_batch_fast_mb_s"]

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

    print(f"tokenizers encode_batch         {figures['encode_batch_mb_s']:7.2f} MB/s")
    print(f"tokenizers encode_batch_fast    {figures['encode_batch_fast_mb_s']:7.2f} MB/s")
    print(
        f"teleflm data prepare            {figures['prepare_mb_s']:7.2f} MB/s  "
        f"= {figures['prepare_vs_encode_batch_fast']:.2f}x encode_batch_fast (target >= 1.0), "
        f"{figures['prepare_vs_encode_batch']:.2f}x encode_batch"
    )
    print(
        f"  with 1 worker process         {figures['prepare_1_worker_mb_s']:7.2f} MB/s "
        f"(all {os.cpu_count()} cores: {figures['prepare_mb_s'] / figures['prepare_1_worker_mb_s']:.2f}x)"
    )
    print(
        f"loader, {BATCH} x {CONTEXT} with document mask  {figures['loader_ms_per_batch']:7.3f} ms per batch "
        f"= {100 * figures['loader_share_of_step']:.2f}% of a tiny model's step ({figures['tiny_step_ms']:.0f} ms; target < 2%)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
