"""Deduplication of raw documents before tokenisation: exact (normalised text) and near (MinHash with
LSH), within and across domains, one global decision over every worker's documents.

Keys. A document's exact key is a 64-bit BLAKE2b hash of its text lower-cased with white-space runs
collapsed. Its near keys come from a MinHash signature of its word 5-gram shingles (words as
teleflm.data.quality splits them) computed by datasketch, cut into b bands of r values, b and r
being datasketch's MinHashLSH choice for the similarity threshold and the number of permutations;
a band's key is a 64-bit hash of its index and its values. Two documents whose shingle sets have
Jaccard similarity s share some band key with probability 1 - (1 - s^r)^b: at the default threshold
0.8 with 128 permutations (b = 9, r = 13), 0.92 at s = 0.85 and 0.002 at s = 0.5.

The decision: documents have a global position (domain in config order, part, document within the
part: the order of the shards). A document is removed when an earlier document shares one of its
keys; exact before near, so each removal is counted once. This is decided per key, so it is computed
in key-range buckets, each holding every worker's keys of its range and nothing else (datasketch's
MinHashLSH index lives in one process's memory, which at a corpus of billions of documents no
process has): each worker writes its parts' keys sorted, a dedup task reads one key range of every
part's file, and the removals it writes are read back by position when the parts are encoded.
Unlike clustering (every member of a connected group but one removed), a document similar only to
documents that are themselves removed is kept, and no global graph is built.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from teleflm.config import AT_LEAST_ONE, NON_NEGATIVE, Range
from teleflm.data.decontaminate import _MULTIPLIER, _mix, ngram_hashes
from teleflm.data.quality import word_hashes, words

EXACT, NEAR = 0, 1
KINDS = ("exact", "near")
_DOMAIN_BITS, _PART_BITS = 8, 24  # position: domain (8 bits) | part (24) | document in the part (32)


@dataclass
class DedupConfig:
    """The data config's `[dedup]` table."""

    exact: bool = False  # remove documents whose normalised text an earlier one has
    near: bool = False  # remove documents an earlier one resembles (MinHash + LSH)
    threshold: float = 0.8  # Jaccard similarity of word-shingle sets the LSH bands are tuned for
    num_perm: int = 128  # MinHash permutations
    shingle: int = 5  # words per shingle
    seed: int = 1  # of the MinHash permutations (the same on every worker)
    across_domains: bool = True  # false: a document is compared with its own domain's only
    examples: int = 5  # removed documents per domain and kind shown in the report
    # Key ranges the decision is split into (0: 4 per worker): the dedup stage's tasks, each holding 16
    # bytes per key of its range (b + 1 keys a document). The result does not depend on it.
    buckets: int = 0

    RANGES = dict(
        threshold=Range(0, 1, open_low=True, open_high=True),
        num_perm=Range(2),
        shingle=AT_LEAST_ONE,
        seed=NON_NEGATIVE,
        examples=NON_NEGATIVE,
        buckets=NON_NEGATIVE,
    )

    @property
    def enabled(self) -> bool:
        return self.exact or self.near


def position(domain: int, part: int, doc: np.ndarray | int):
    """Global position of document `doc` of a part: sorting positions sorts by the shards' order."""
    base = (domain << (_PART_BITS + 32)) | (part << 32)
    return np.uint64(base) + np.asarray(doc, dtype=np.uint64)


def part_range(domain: int, part: int) -> tuple[np.uint64, np.uint64]:
    """The positions of one part's documents: [lo, hi)."""
    return position(domain, part, 0), position(domain, part, 0) + np.uint64(1 << 32)


def unpack(pos: int) -> tuple[int, int, int]:
    """(domain, part, document) of a position."""
    pos = int(pos)
    return pos >> (_PART_BITS + 32), (pos >> 32) & ((1 << _PART_BITS) - 1), pos & 0xFFFFFFFF


def exact_key(text: str) -> int:
    normalised = " ".join(text.lower().split())
    return int.from_bytes(hashlib.blake2b(normalised.encode(), digest_size=8).digest(), "little")


class Signer:
    """Exact and near keys of documents, for one config (the same on every worker)."""

    def __init__(self, config: DedupConfig):
        from datasketch import MinHash, MinHashLSH

        self.config = config
        lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
        self.bands, self.rows = lsh.b, lsh.r
        self._template = MinHash(num_perm=config.num_perm, seed=config.seed, scheme="affine64")
        self._minhash = MinHash
        with np.errstate(over="ignore"):
            self._band_salt = _mix(np.arange(self.bands, dtype=np.uint64))

    def near_keys(self, tokens: list[str]) -> np.ndarray | None:
        """The b band keys of a document's words (None for a document without words)."""
        if not tokens:
            return None
        hashes = word_hashes(tokens)
        # 64-bit shingle hashes, permuted by datasketch's "affine64" scheme.
        shingles = np.unique(ngram_hashes(hashes, min(self.config.shingle, len(tokens))))
        m = self._minhash(
            num_perm=self.config.num_perm,
            permutations=self._template.permutations,
            hashfunc=_identity,
            scheme="affine64",
        )
        m.update_batch(shingles)
        bands = _mix(m.hashvalues[: self.bands * self.rows].reshape(self.bands, self.rows))
        keys = np.zeros(self.bands, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(self.rows):
                keys = keys * _MULTIPLIER + bands[:, j]
            return keys * _MULTIPLIER + self._band_salt


def shingle_jaccard(a: str, b: str, shingle: int = 5) -> float:
    """The Jaccard similarity of two documents' word-shingle sets: what their near keys' MinHash
    signatures estimate (a document shorter than a shingle is one shingle of all its words)."""

    def shingles(text: str) -> set:
        w = words(text)
        return {tuple(w[i : i + shingle]) for i in range(max(len(w) - shingle + 1, 1))} if w else set()

    x, y = shingles(a), shingles(b)
    return len(x & y) / max(len(x | y), 1)


def _identity(value):
    return value


def scope(key: np.ndarray, domain: int, across_domains: bool) -> np.ndarray:
    """Keys of one domain's documents: as they are when domains are compared with each other, else
    salted by the domain so that equal texts of two domains never meet."""
    if across_domains:
        return key
    with np.errstate(over="ignore"):
        return key ^ _mix(np.array([domain + 1], dtype=np.uint64))[0]


def write_keys(folder: Path, kind: int, keys: list[np.ndarray], positions: list[np.ndarray]) -> None:
    """One part's keys of one kind, sorted by (key, position), as two .npy files."""
    keys_array = np.concatenate(keys) if keys else np.empty(0, np.uint64)
    pos_array = np.concatenate(positions) if positions else np.empty(0, np.uint64)
    order = np.lexsort((pos_array, keys_array))
    np.save(folder / f"{KINDS[kind]}_keys.npy", keys_array[order])
    np.save(folder / f"{KINDS[kind]}_pos.npy", pos_array[order])


def bucket_bounds(bucket: int, buckets: int) -> tuple[int, int]:
    """The key range [lo, hi) of one bucket (hi = 2**64 for the last, as a Python int)."""
    step = (1 << 64) // buckets
    return bucket * step, (bucket + 1) * step if bucket + 1 < buckets else 1 << 64


def _slice(folder: Path, kind: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    keys = np.load(folder / f"{KINDS[kind]}_keys.npy", mmap_mode="r")
    first = int(np.searchsorted(keys, np.uint64(lo)))
    last = len(keys) if hi >= 1 << 64 else int(np.searchsorted(keys, np.uint64(hi)))
    positions = np.load(folder / f"{KINDS[kind]}_pos.npy", mmap_mode="r")
    return np.asarray(keys[first:last]), np.asarray(positions[first:last])


def decide(scan_folders: list[Path], bucket: int, buckets: int, kinds: list[int]) -> dict[str, np.ndarray]:
    """The removals of one key range over every part: positions removed (sorted, unique), the
    earliest document each duplicates, and the kind (exact wins over near)."""
    lo, hi = bucket_bounds(bucket, buckets)
    removed, kept, kind_of = [], [], []
    for kind in kinds:
        pieces = [_slice(folder, kind, lo, hi) for folder in scan_folders]
        keys = np.concatenate([k for k, _ in pieces]) if pieces else np.empty(0, np.uint64)
        pos = np.concatenate([p for _, p in pieces]) if pieces else np.empty(0, np.uint64)
        order = np.lexsort((pos, keys))
        keys, pos = keys[order], pos[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        earliest = pos[np.maximum.accumulate(np.where(first, np.arange(len(keys)), 0))]
        dup = ~first & (pos != earliest)
        removed.append(pos[dup])
        kept.append(earliest[dup])
        kind_of.append(np.full(int(dup.sum()), kind, dtype=np.uint8))
    removed_all, kept_all, kind_all = (np.concatenate(a) for a in (removed, kept, kind_of))
    # One entry per removed document: its lowest kind (exact first), then its earliest original.
    order = np.lexsort((kept_all, kind_all, removed_all))
    removed_all, kept_all, kind_all = removed_all[order], kept_all[order], kind_all[order]
    unique = np.ones(len(removed_all), dtype=bool)
    unique[1:] = removed_all[1:] != removed_all[:-1]
    return {"removed": removed_all[unique], "kept": kept_all[unique], "kind": kind_all[unique]}


def save_decision(folder: Path, decision: dict[str, np.ndarray], examples: int) -> None:
    """The bucket's removals, and the positions of its first `examples` per domain (the report's
    candidates)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in decision.items():
        np.save(folder / f"{name}.npy", array)
    domain = (decision["removed"] >> np.uint64(_PART_BITS + 32)).astype(np.int64)
    first = [np.flatnonzero(domain == d)[:examples] for d in np.unique(domain)]
    chosen = np.sort(np.concatenate(first)) if first else np.empty(0, np.int64)
    np.save(folder / "examples.npy", decision["removed"][chosen])


def removed_in_part(decision_folders: list[Path], domain: int, part: int) -> tuple[np.ndarray, np.ndarray]:
    """(document indices within the part, kind) of the part's removed documents, sorted."""
    lo, hi = part_range(domain, part)
    docs, kinds = [], []
    for folder in decision_folders:
        removed = np.load(folder / "removed.npy", mmap_mode="r")
        first, last = np.searchsorted(removed, lo), np.searchsorted(removed, hi)
        docs.append(np.asarray(removed[first:last]) - lo)
        kinds.append(np.load(folder / "kind.npy", mmap_mode="r")[first:last])
    doc_array = np.concatenate(docs).astype(np.int64) if docs else np.empty(0, np.int64)
    kind_array = np.concatenate(kinds) if kinds else np.empty(0, np.uint8)
    order = np.lexsort((kind_array, doc_array))  # a document in two buckets' lists: exact first
    return doc_array[order], kind_array[order]


def report_examples(decision_folders: list[Path], examples: int) -> list[tuple[int, int, int]]:
    """(removed position, kept position, kind) of the report: per domain the `examples` earliest
    removed documents over every bucket, each under its kind over every bucket (exact first) with
    the earliest document it duplicates: the same list on every worker, whatever the buckets."""
    candidates = [np.load(folder / "examples.npy") for folder in decision_folders]
    positions = np.unique(np.concatenate(candidates)) if candidates else np.empty(0, np.uint64)
    chosen, per_domain = [], {}
    for pos in positions.tolist():
        domain = unpack(pos)[0]
        if per_domain.get(domain, 0) < examples:
            per_domain[domain] = per_domain.get(domain, 0) + 1
            chosen.append(pos)
    entries = {pos: [] for pos in chosen}
    for folder in decision_folders:
        removed = np.load(folder / "removed.npy", mmap_mode="r")
        kept, kind = np.load(folder / "kept.npy", mmap_mode="r"), np.load(folder / "kind.npy", mmap_mode="r")
        for pos in chosen:
            i = int(np.searchsorted(removed, np.uint64(pos)))
            if i < len(removed) and int(removed[i]) == pos:
                entries[pos].append((int(kind[i]), int(kept[i])))
    return [(pos, min(entries[pos])[1], min(entries[pos])[0]) for pos in chosen]
