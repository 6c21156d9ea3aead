"""The token shards on disk: writing them (SplitWriter) and reading them back (open_shards).

A shards folder holds `manifest.json` and one folder per domain with, per split (train, val), three
flat arrays (native byte order, little-endian on every machine we train on):
  `{split}.tokens`   every document's token ids end to end (uint16 when the vocabulary fits, else uint32)
  `{split}.offsets`  int64, n_docs + 1: document i is tokens[offsets[i]:offsets[i + 1]]
  `{split}.bytes`    int64, n_docs: UTF-8 size of each document's text (the denominator of bits per byte)
The manifest records sizes and sha256 of every file, the tokenizer's hash, and `complete`, which only
a finished `teleflm data prepare` sets: a folder left by an interrupted run is refused.
"""

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from teleflm.config import read_json

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
KINDS = ("tokens", "offsets", "bytes")


class ShardError(ValueError):
    pass


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class SplitWriter:
    """Appends documents to one split's three files, hashing them as they are written."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        self.paths = {kind: folder / f"{split}.{kind}" for kind in KINDS}
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
        """Flush to disk; returns the split's manifest entry."""
        for f in self.files.values():
            f.flush()
            f.close()
        return {
            "documents": self.n_docs,
            "tokens": self.n_tokens,
            "bytes": self.n_bytes,
            "sizes": {kind: path.stat().st_size for kind, path in self.paths.items()},
            "sha256": {kind: h.hexdigest() for kind, h in self.hashes.items()},
        }


class Shards:
    """A verified shards folder: memory-mapped arrays per domain and split."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.domains: list[str] = list(manifest["domains"])
        self._arrays: dict[tuple[str, str, str], np.ndarray] = {}

    def _array(self, domain: str, split: str, kind: str) -> np.ndarray:
        if domain not in self.manifest["domains"]:
            raise ShardError(f"{self.root}: no domain {domain!r} (domains: {self.domains})")
        if split not in SPLITS:
            raise ShardError(f"split must be one of {SPLITS}, got {split!r}")
        key = (domain, split, kind)
        if key not in self._arrays:
            dtype = self.dtype if kind == "tokens" else np.dtype(np.int64)
            path = self.root / domain / f"{split}.{kind}"
            # np.memmap refuses empty files; an empty split is an empty array.
            self._arrays[key] = (
                np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
            )
        return self._arrays[key]

    def tokens(self, domain: str, split: str = "train") -> np.ndarray:
        return self._array(domain, split, "tokens")

    def doc_offsets(self, domain: str, split: str = "train") -> np.ndarray:
        return self._array(domain, split, "offsets")

    def doc_bytes(self, domain: str, split: str = "train") -> np.ndarray:
        return self._array(domain, split, "bytes")

    def n_tokens(self, domain: str, split: str = "train") -> int:
        return self.split_info(domain, split)["tokens"]

    def split_info(self, domain: str, split: str = "train") -> dict:
        """The manifest's entry for a domain's split: documents, tokens, bytes, sizes, sha256."""
        self._array(domain, split, "offsets")  # checks the names
        return self.manifest["domains"][domain]["splits"][split]

    def documents(self, domain: str, split: str = "train") -> Iterator[tuple[np.ndarray, int]]:
        """(token ids, UTF-8 bytes of the text) of each document, in order."""
        tokens, offsets, sizes = (
            self.tokens(domain, split),
            self.doc_offsets(domain, split),
            self.doc_bytes(domain, split),
        )
        for i in range(len(sizes)):
            yield np.asarray(tokens[offsets[i] : offsets[i + 1]]), int(sizes[i])

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
    """(path, manifest entry of its split, kind) of every file the manifest lists."""
    for domain, entry in manifest["domains"].items():
        for split in SPLITS:
            for kind in KINDS:
                yield root / domain / f"{split}.{kind}", entry["splits"][split], kind


def verify_shards(shards: Shards) -> None:
    """Hash every file of an opened shards folder against its manifest (a full read of the data);
    raises ShardError naming the first altered file."""
    for path, info, kind in _shard_files(shards.root, shards.manifest):
        if file_sha256(path) != info["sha256"][kind]:
            raise ShardError(
                f"shard {path}: checksum mismatch with {shards.root / MANIFEST}: the file was altered or damaged"
            )
