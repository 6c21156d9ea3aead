"""Test-set decontamination by token n-grams (the "strict n-gram method" of Tele-FLM's data).

Every n-token window of every test document is hashed to 64 bits; a training document that shares
any window with a test document is contaminated and is removed (or only counted). Hashing keeps the
test set's n-grams in a sorted array of 8 bytes each, whatever n is; a false match needs a 64-bit
collision, so at worst an innocent document is dropped. Test documents shorter than n tokens have no
n-gram and cannot match (the manifest counts them).
"""

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_NGRAM = 13
_MULTIPLIER = np.uint64(0x100000001B3)  # FNV-64 prime: an odd multiplier for the polynomial hash


def _mix(tokens: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser per token id: spreads small ids over 64 bits before they are combined."""
    x = tokens.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of each n-token window of `tokens` (len - n + 1 of them); equal windows hash equal.
    n passes over the array, so memory stays at a few times the input whatever n is."""
    count = len(tokens) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    mixed = _mix(np.asarray(tokens))
    hashes = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            hashes = hashes * _MULTIPLIER + mixed[j : j + count]
    return hashes


def window_documents(offsets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For documents laid end to end (`offsets`, n_docs + 1 positions): the start of every n-token
    window lying inside one document, and that document's index."""
    lengths = np.diff(offsets)
    per_doc = np.maximum(lengths - n + 1, 0)
    doc = np.repeat(np.arange(len(lengths)), per_doc)
    first = np.cumsum(per_doc) - per_doc  # index of each document's first window in `doc`
    starts = offsets[:-1][doc] + np.arange(len(doc)) - first[doc]
    return starts, doc


@dataclass
class NgramIndex:
    """The n-gram hashes of a test set, and what the manifest records about it (`info`)."""

    n: int
    hashes: np.ndarray  # sorted, unique uint64
    info: dict

    def contaminated(self, tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Which of the documents laid end to end in `tokens` (bounds `offsets`) share an n-gram
        with the test set: a bool per document."""
        n_docs = len(offsets) - 1
        if len(self.hashes) == 0:
            return np.zeros(n_docs, dtype=bool)
        starts, doc = window_documents(offsets, self.n)
        windows = ngram_hashes(tokens, self.n)[starts]
        found = np.searchsorted(self.hashes, windows)
        hit = self.hashes[np.minimum(found, len(self.hashes) - 1)] == windows
        return np.bincount(doc[hit], minlength=n_docs) > 0


def load_test_ngrams(
    patterns: list[str], encoder, n: int = DEFAULT_NGRAM, text_field: str = "text"
) -> NgramIndex:
    """Read test documents (files or globs, any format teleflm.data.sources reads), encode them with
    the shards' tokenizer (`tokenizers.Tokenizer`) and collect their n-gram hashes."""
    from teleflm.data.sources import ReadStats, read_documents

    if n < 1:
        raise ValueError(f"--ngram must be at least 1, got {n}")
    files = []
    for pattern in patterns:
        found = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file())
        if not found:
            raise FileNotFoundError(f"--decontaminate {pattern!r}: matches no file")
        files += found
    hashes, n_docs, too_short = [], 0, 0
    stats = ReadStats()
    for path in files:
        docs = list(read_documents(path, text_field=text_field, stats=stats))
        for enc in encoder.encode_batch_fast(docs, add_special_tokens=False):
            doc_hashes = ngram_hashes(np.asarray(enc.ids), n)
            too_short += len(doc_hashes) == 0
            hashes.append(doc_hashes)
        n_docs += len(docs)
    unique = np.unique(np.concatenate(hashes)) if hashes else np.empty(0, np.uint64)
    info = {
        "ngram": n,
        "test_files": [
            {"path": str(f), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files
        ],
        "test_documents": n_docs,
        "test_documents_shorter_than_ngram": too_short,
        "test_ngrams": len(unique),
    }
    return NgramIndex(n, unique, info)
