"""Test-set decontamination by token n-grams (the "strict n-gram method" of Tele-FLM's data).

Test items come from files (any format teleflm.data.sources reads) or are given as texts by name:
the documents of lm-evaluation-harness tasks, as teleflm.eval.harness.task_items renders them from
local task definitions (what the model is scored on).

Every n-token window of every test item is hashed to 64 bits; a training document that shares any
window with a test item is contaminated and is removed (or only counted). The test side is a sorted
array of 8 bytes per distinct window whatever n is, built in bounded batches; a false match needs a
64-bit collision, so at worst an innocent document is dropped.

Short items, of m < n tokens: one of at least MIN_ITEM_TOKENS is matched whole, its m-token
sequence, as written and after a space (as it reads inside a training text, where byte-level BPE
gives its first word another token); a shorter one ("yes", "Paris") would match ordinary text
everywhere, and is skipped and counted in the manifest.
"""

import glob
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_NGRAM = 13
MIN_ITEM_TOKENS = 8  # shortest test item matched whole (see the module's docstring)
_BATCH = 1 << 22  # test n-gram hashes collected before they are merged into the sorted set
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
    return next(iter(window_hashes(tokens, [n]).values()))


def window_hashes(tokens: np.ndarray, lengths: list[int]) -> dict[int, np.ndarray]:
    """`ngram_hashes` for each window length in `lengths`, in one pass of max(lengths) steps: the
    polynomial hash of a window of m + 1 tokens extends the one of its first m."""
    mixed = _mix(np.asarray(tokens))
    out: dict[int, np.ndarray] = {}
    hashes = np.zeros(len(mixed), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for m in range(1, max(lengths) + 1):
            count = max(len(mixed) - m + 1, 0)
            hashes = hashes[:count] * _MULTIPLIER + mixed[m - 1 : m - 1 + count]
            if m in lengths:
                out[m] = hashes
    return out


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
    """The window hashes of a test set by window length (n, and the lengths of short items matched
    whole), and what the manifest records about it (`info`)."""

    n: int
    hashes: dict[int, np.ndarray]  # window length -> sorted, unique uint64
    info: dict = field(default_factory=dict)

    def contaminated(self, tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Which of the documents laid end to end in `tokens` (bounds `offsets`) share a window with
        the test set: a bool per document."""
        n_docs = len(offsets) - 1
        dirty = np.zeros(n_docs, dtype=bool)
        lengths = [m for m, h in self.hashes.items() if len(h)]
        if not lengths or n_docs == 0:
            return dirty
        for m, hashes in window_hashes(tokens, lengths).items():
            starts, doc = window_documents(offsets, m)
            windows = hashes[starts]
            table = self.hashes[m]
            hit = table[np.minimum(np.searchsorted(table, windows), len(table) - 1)] == windows
            dirty[doc[hit]] = True
        return dirty

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for m, hashes in self.hashes.items():
            np.save(folder / f"{m}.npy", hashes)

    @classmethod
    def load(cls, folder: Path, n: int, info: dict) -> "NgramIndex":
        """Memory-mapped: the workers of one machine share the pages."""
        hashes = {int(p.stem): np.load(p, mmap_mode="r") for p in sorted(folder.glob("*.npy"))}
        return cls(n, hashes, info)


class _HashSet:
    """A growing set of uint64 kept as a sorted unique array, merged in batches of _BATCH hashes:
    memory is the set plus one batch, not every window of every item."""

    def __init__(self):
        self.sorted = np.empty(0, np.uint64)
        self.pending: list[np.ndarray] = []
        self.n_pending = 0

    def add(self, hashes: np.ndarray) -> None:
        self.pending.append(hashes)
        self.n_pending += len(hashes)
        if self.n_pending >= _BATCH:
            self.merge()

    def merge(self) -> np.ndarray:
        if self.pending:
            self.sorted = np.unique(np.concatenate([self.sorted, *self.pending]))
            self.pending, self.n_pending = [], 0
        return self.sorted


def load_test_ngrams(
    patterns: list[str],
    encoder,
    n: int = DEFAULT_NGRAM,
    text_field: str = "text",
    items: dict[str, list[str]] | None = None,
    min_item_tokens: int = MIN_ITEM_TOKENS,
) -> NgramIndex:
    """Read test items (files or globs, any format teleflm.data.sources reads; `items`: more, as texts
    by the name of their source, e.g. an lm-eval task), encode them with the shards' tokenizer
    (`tokenizers.Tokenizer`) and collect their window hashes."""
    from teleflm.data.sources import ReadStats, read_documents

    if n < 1:
        raise ValueError(f"--ngram must be at least 1, got {n}")
    files = []
    for pattern in patterns:
        found = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file())
        if not found:
            raise FileNotFoundError(f"--decontaminate {pattern!r}: matches no file")
        files += found
    sets: dict[int, _HashSet] = {}
    counts = {"test_documents": 0, "test_documents_matched_whole": 0, "test_documents_too_short": 0}

    def add(items: list[str]) -> None:
        counts["test_documents"] += len(items)
        spaced = [" " + item for item in items]
        encodings = encoder.encode_batch_fast(items + spaced, add_special_tokens=False)
        for plain, after_space in zip(encodings[: len(items)], encodings[len(items) :], strict=True):
            ids = np.asarray(plain.ids)
            if len(ids) >= n:
                sets.setdefault(n, _HashSet()).add(ngram_hashes(ids, n))
                continue
            whole = [np.asarray(e.ids) for e in (plain, after_space) if min_item_tokens <= len(e.ids) < n]
            for ids in whole:
                sets.setdefault(len(ids), _HashSet()).add(ngram_hashes(ids, len(ids)))
            counts["test_documents_matched_whole" if whole else "test_documents_too_short"] += 1

    stats = ReadStats()
    for path in files:
        batch = []
        for doc in read_documents(path, text_field=text_field, stats=stats):
            batch.append(doc)
            if len(batch) == 4096:
                add(batch)
                batch = []
        add(batch)
    for texts in (items or {}).values():
        for start in range(0, len(texts), 4096):
            add(texts[start : start + 4096])
    hashes = {m: sets[m].merge() for m in sorted(sets)}
    info = {
        "ngram": n,
        "min_item_tokens": min_item_tokens,
        "test_files": [
            {"path": str(f), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files
        ],
        "test_tasks": {name: len(texts) for name, texts in (items or {}).items()},
        **counts,
        "test_ngrams": int(sum(len(h) for h in hashes.values())),
    }
    return NgramIndex(n, hashes, info)
