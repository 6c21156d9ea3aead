"""A deterministic stream with MixtureStream's interface over a fixed array of sequences, for tests and
benchmarks that must not depend on prepared data."""

import numpy as np


class ArrayStream:
    """Global sequence g of `sequences` goes to rank g % dp_size; state: global sequences consumed."""

    def __init__(self, sequences: np.ndarray, dp_rank: int = 0, dp_size: int = 1, poison: dict | None = None):
        self.sequences = sequences
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed = 0
        self.poison = poison or {}  # global sequence index -> replacement sequence

    def next_sequences(self, n: int) -> dict:
        start = self.consumed + self.dp_rank
        idx = [(start + i * self.dp_size) for i in range(n)]
        self.consumed += n * self.dp_size
        rows = [self.poison.get(g, self.sequences[g % len(self.sequences)]) for g in idx]
        return {"tokens": np.stack(rows).astype(np.int64), "domain": np.zeros(n, dtype=np.int64)}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = state["consumed"]


def write_synthetic_shards(
    root, domains: dict[str, int], mean_tokens: int = 8, vocab_size: int = 1000, seed: int = 0
):
    """A complete shards folder of random documents, `domains[name]` of them per domain (train split;
    val gets a tenth as many), lengths 1 .. 2 * mean_tokens - 1: a corpus of any size for tests and
    benchmarks of the stream, written in bounded memory. Returns the opened Shards."""
    import json
    from pathlib import Path

    from teleflm.data.shards import (
        FORMAT_VERSION,
        MANIFEST,
        SPLITS,
        SplitWriter,
        open_shards,
        split_entry,
        token_dtype,
    )

    root = Path(root)
    rng = np.random.default_rng(seed)
    dtype = token_dtype(vocab_size)
    manifest = {"format": FORMAT_VERSION, "tokenizer_hash": "synthetic", "vocab_size": vocab_size}
    manifest |= {"dtype": dtype.name, "domains": {}, "complete": True}
    for name, n_docs in domains.items():
        (root / name).mkdir(parents=True)
        splits = {}
        for split, n in zip(SPLITS, (n_docs, n_docs // 10), strict=True):
            writer = SplitWriter(root / name, split, 0, dtype)
            for start in range(0, n, 1 << 20):
                lengths = rng.integers(1, 2 * mean_tokens, min(1 << 20, n - start))
                tokens = rng.integers(4, vocab_size, int(lengths.sum()))
                writer.add(tokens, lengths, lengths * 4)
            splits[split] = split_entry([writer.close()])
        manifest["domains"][name] = {"proportion": 1.0, "epochs": 1.0, "splits": splits}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return open_shards(root)


def synthetic_documents(n_docs: int, mean_words: int = 300, vocabulary: int = 20_000, seed: int = 0):
    """`n_docs` documents of words drawn uniformly from a vocabulary of random lower-case words, each
    beginning with its number: distinct documents (two share a 5-word shingle rarely) at about
    6 bytes a word, made fast enough for gigabytes (a C join per document)."""
    from operator import itemgetter

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(2, 9, vocabulary)
    words = ["".join(letters[rng.integers(0, 26, n)]) for n in lengths]
    for i in range(n_docs):
        picks = rng.integers(0, vocabulary, int(rng.integers(mean_words // 2, 3 * mean_words // 2)))
        yield f"document {i}: " + " ".join(itemgetter(*picks)(words))


def write_synthetic_corpus(path, megabytes: float, seed: int = 0, mean_words: int = 300):
    """About `megabytes` of `synthetic_documents` as JSONL at `path`; returns the documents written."""
    import json

    written = n = 0
    with open(path, "w") as f:
        for n, doc in enumerate(synthetic_documents(1 << 62, mean_words, seed=seed), 1):  # noqa: B007
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            written += len(line)
            if written >= megabytes * 1e6:
                break
    return n
