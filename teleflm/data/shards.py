"""The token shards on disk: writing them (SplitWriter) and reading them back (open_shards).

A shards folder holds `manifest.json` and one folder per domain. Each domain's documents are written
in parts, one per piece of its input that `teleflm data prepare` plans (a few files or a byte range of
one, about `part_bytes` of raw text: what one worker prepares on its own); part k of a split is three
flat arrays (native byte order, little-endian on every machine we train on):
  `{split}-{k:05d}.tokens`   every document's token ids end to end (uint16 when the vocabulary fits, else uint32)
  `{split}-{k:05d}.offsets`  int64, n_docs + 1: document i is tokens[offsets[i]:offsets[i + 1]]
  `{split}-{k:05d}.bytes`    int64, n_docs: UTF-8 size of each document's text (the denominator of bits per byte)
Readers see a split as one array of each kind, the parts end to end in the manifest's order
(PartedArray). The manifest records sizes and sha256 of every file, the tokenizer's hash, and
`complete`, which only a finished `teleflm data prepare` sets: a folder left by an interrupted run is
refused.
"""

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from teleflm.config import read_json

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: splits in parts (1: one file per split, read by no version since)
SPLITS = ("train", "val")
KINDS = ("tokens", "offsets", "bytes")


class ShardError(ValueError):
    pass


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def part_file(domain_dir: Path, split: str, part: int, kind: str) -> Path:
    return domain_dir / f"{split}-{part:05d}.{kind}"


class SplitWriter:
    """Appends documents to one part of a split (three files), hashing them as they are written."""

    def __init__(self, folder: Path, split: str, part: int, dtype: np.dtype):
        self.part = part
        self.paths = {kind: part_file(folder, split, part, kind) for kind in KINDS}
        self.files = {kind: path.open("wb") for kind, path in self.paths.items()}
        self.hashes = {kind: hashlib.sha256() for kind in KINDS}
        self.dtype = dtype
        self.n_tokens = self.n_docs = self.n_bytes = 0
        self._write("offsets", np.zeros(1, dtype=np.int64))

    def _write(self, kind: str, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).data  # the array's own memory, not a copy
        self.files[kind].write(data)
        self.hashes[kind].update(data)

    def add(self, tokens: np.ndarray, lengths: np.ndarray, n_bytes: np.ndarray) -> None:
        """Documents laid end to end in `tokens`, with their token counts and UTF-8 sizes."""
        if len(lengths) == 0:
            return
        self._write("tokens", tokens.astype(self.dtype, copy=False))
        self._write("offsets", self.n_tokens + np.cumsum(lengths, dtype=np.int64))
        self._write("bytes", n_bytes.astype(np.int64, copy=False))
        self.n_tokens += int(lengths.sum())
        self.n_docs += len(lengths)
        self.n_bytes += int(n_bytes.sum())

    def close(self) -> dict:
        """Flush to disk; returns the part's manifest entry."""
        for f in self.files.values():
            f.flush()
            f.close()
        return {
            "part": self.part,
            "documents": self.n_docs,
            "tokens": self.n_tokens,
            "bytes": self.n_bytes,
            "sizes": {kind: path.stat().st_size for kind, path in self.paths.items()},
            "sha256": {kind: h.hexdigest() for kind, h in self.hashes.items()},
        }


class PartedArray:
    """The parts of one split's array of one kind, end to end, read as one array: by int, by slice
    (step 1) or by an integer array, as the mixture reads a memmap. Offsets are shifted per part so
    that they index the concatenated tokens. Parts are memory-mapped when first read."""

    def __init__(self, paths: list[Path], lengths: list[int], shifts: list[int], skips: list[int], dtype):
        self.paths, self.dtype = paths, np.dtype(dtype)
        self.shifts, self.skips = shifts, skips  # value added to a part's elements; leading ones dropped
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.shape = (int(self.starts[-1]),)
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def _part(self, k: int) -> np.ndarray:
        if k not in self._maps:
            path = self.paths[k]
            # np.memmap refuses empty files; an empty part is an empty array.
            self._maps[k] = (
                np.memmap(path, dtype=self.dtype, mode="r")
                if path.stat().st_size
                else np.zeros(0, self.dtype)
            )
        return self._maps[k]

    def _read(self, k: int, lo: int, hi: int) -> np.ndarray:
        """Elements lo .. hi - 1 of part k, in the concatenated array's numbering."""
        first = self.skips[k] + lo - int(self.starts[k])
        values = self._part(k)[first : first + hi - lo]
        return values + self.shifts[k] if self.shifts[k] else np.asarray(values)

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            lo, hi, step = key.indices(n)
            if step != 1:
                raise IndexError("parted arrays are read by slices of step 1")
            hi = max(hi, lo)
            first = max(int(np.searchsorted(self.starts, lo, side="right")) - 1, 0)
            last = int(np.searchsorted(self.starts, hi, side="left"))
            pieces = [
                self._read(k, max(lo, int(self.starts[k])), min(hi, int(self.starts[k + 1])))
                for k in range(first, min(last, len(self.paths)))
            ]
            return np.concatenate(pieces) if len(pieces) != 1 else pieces[0]
        if isinstance(key, int | np.integer):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"index {key} is out of bounds for length {n}")
            k = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self._read(k, i, i + 1)[0]
        index = np.asarray(key)
        index = np.where(index < 0, index + n, index)
        if index.size and (index.min() < 0 or index.max() >= n):
            raise IndexError(f"index out of bounds for length {n}")
        part = np.searchsorted(self.starts, index, side="right") - 1
        out = np.empty(index.shape, dtype=self.dtype)
        for k in np.unique(part):
            chosen = part == k
            local = index[chosen] - int(self.starts[k]) + self.skips[k]
            out[chosen] = self._part(int(k))[local] + self.shifts[k]
        return out

    def __array__(self, dtype=None, copy=None):
        whole = self[0 : len(self)]
        return whole.astype(dtype, copy=False) if dtype is not None else whole


def split_entry(parts: list[dict]) -> dict:
    """A split's manifest entry: its totals and its parts' entries, in order."""
    totals = {key: sum(p[key] for p in parts) for key in ("documents", "tokens", "bytes")}
    return {**totals, "parts": parts}


class Shards:
    """A verified shards folder: one array per domain, split and kind (the parts end to end)."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.domains: list[str] = list(manifest["domains"])
        self._arrays: dict[tuple[str, str, str], np.ndarray | PartedArray] = {}

    def _array(self, domain: str, split: str, kind: str):
        if domain not in self.manifest["domains"]:
            raise ShardError(f"{self.root}: no domain {domain!r} (domains: {self.domains})")
        if split not in SPLITS:
            raise ShardError(f"split must be one of {SPLITS}, got {split!r}")
        key = (domain, split, kind)
        if key not in self._arrays:
            parts = self.manifest["domains"][domain]["splits"][split]["parts"]
            paths = [part_file(self.root / domain, split, p["part"], kind) for p in parts]
            docs, tokens = [p["documents"] for p in parts], [p["tokens"] for p in parts]
            if kind == "tokens":
                shifts, skips, lengths = [0] * len(parts), [0] * len(parts), tokens
            elif kind == "bytes":
                shifts, skips, lengths = [0] * len(parts), [0] * len(parts), docs
            else:  # each part's offsets start at 0: all but the first drop it and add the tokens before
                shifts = np.concatenate([[0], np.cumsum(tokens)[:-1]]).astype(int).tolist()
                skips = [0] + [1] * (len(parts) - 1)
                lengths = [d + 1 - s for d, s in zip(docs, skips, strict=True)]
            dtype = self.dtype if kind == "tokens" else np.dtype(np.int64)
            array = PartedArray(paths, lengths, shifts, skips, dtype)
            self._arrays[key] = array._part(0) if len(parts) == 1 else array
        return self._arrays[key]

    def tokens(self, domain: str, split: str = "train"):
        return self._array(domain, split, "tokens")

    def doc_offsets(self, domain: str, split: str = "train"):
        return self._array(domain, split, "offsets")

    def doc_bytes(self, domain: str, split: str = "train"):
        return self._array(domain, split, "bytes")

    def n_tokens(self, domain: str, split: str = "train") -> int:
        return self.split_info(domain, split)["tokens"]

    def split_info(self, domain: str, split: str = "train") -> dict:
        """The manifest's entry for a domain's split: documents, tokens, bytes, and its parts (each
        with its documents, tokens, bytes, file sizes and sha256)."""
        self._array(domain, split, "offsets")  # checks the names
        return self.manifest["domains"][domain]["splits"][split]

    def documents(self, domain: str, split: str = "train") -> Iterator[tuple[np.ndarray, int]]:
        """(token ids, UTF-8 bytes of the text) of each document, in order."""
        tokens, offsets, sizes = (
            self.tokens(domain, split),
            self.doc_offsets(domain, split),
            self.doc_bytes(domain, split),
        )
        for start in range(0, len(sizes), 1 << 16):  # offsets in blocks: one read per block, not per document
            block = np.asarray(offsets[start : min(start + (1 << 16), len(sizes)) + 1])
            block_sizes = np.asarray(sizes[start : start + len(block) - 1])
            for i in range(len(block) - 1):
                yield np.asarray(tokens[int(block[i]) : int(block[i + 1])]), int(block_sizes[i])

    def mixture(self):
        """The mixture table of the data config the shards were made from."""
        from teleflm.data.mixture import DomainWeight

        return [
            DomainWeight(name, d["proportion"], d["epochs"]) for name, d in self.manifest["domains"].items()
        ]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise ShardError(f"{root}: no {MANIFEST}: not a `teleflm data prepare` output")
    manifest = read_json(path, ShardError)
    if manifest.get("format") != FORMAT_VERSION:
        raise ShardError(f"{path}: format {manifest.get('format')!r}, this version reads {FORMAT_VERSION}")
    return manifest


def open_shards(root: str | Path, expected_tokenizer_hash: str | None = None) -> Shards:
    """Open a shards folder made by `teleflm data prepare`. Refuses an unfinished one and shards of
    another tokenizer than `expected_tokenizer_hash`, and checks that every file exists with the size
    the manifest records (a truncated file is refused). Checksums are not read here: hashing terabytes
    at every start would take hours; `verify_shards` (`teleflm data verify`) does it on demand."""
    root = Path(root)
    manifest = read_manifest(root)
    if not manifest.get("complete"):
        raise ShardError(
            f"{root}: incomplete (an interrupted `teleflm data prepare`): run it again, finished domains are kept"
        )
    if expected_tokenizer_hash is not None and manifest["tokenizer_hash"] != expected_tokenizer_hash:
        raise ShardError(
            f"{root} was made with another tokenizer: its tokenizer.json sha256 is {manifest['tokenizer_hash']}, "
            f"the configured tokenizer's is {expected_tokenizer_hash}; re-run `teleflm data prepare` with it"
        )
    for path, info, kind in _shard_files(root, manifest):
        if not path.is_file():
            raise ShardError(f"shard {path} is missing")
        if path.stat().st_size != info["sizes"][kind]:
            raise ShardError(
                f"shard {path} has {path.stat().st_size} bytes, the manifest says {info['sizes'][kind]}: "
                "truncated or altered"
            )
    return Shards(root, manifest)


def _shard_files(root: Path, manifest: dict) -> Iterator[tuple[Path, dict, str]]:
    """(path, manifest entry of its part, kind) of every file the manifest lists."""
    for domain, entry in manifest["domains"].items():
        for split in SPLITS:
            for part in entry["splits"][split]["parts"]:
                for kind in KINDS:
                    yield part_file(root / domain, split, part["part"], kind), part, kind


def verify_shards(shards: Shards) -> None:
    """Hash every file of an opened shards folder against its manifest (a full read of the data);
    raises ShardError naming the first altered file."""
    for path, info, kind in _shard_files(shards.root, shards.manifest):
        if file_sha256(path) != info["sha256"][kind]:
            raise ShardError(
                f"shard {path}: checksum mismatch with {shards.root / MANIFEST}: the file was altered or damaged"
            )
