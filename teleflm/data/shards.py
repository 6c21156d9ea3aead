"""Reading prepared shards: memory-mapped tokens per domain and split, verified against the manifest."""

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from teleflm.data.prepare import MANIFEST, SPLITS


class ShardError(ValueError):
    pass


class Shards:
    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.domains = list(manifest["domains"])
        self._cache: dict = {}

    def _file(self, domain: str, split: str, kind: str) -> np.ndarray:
        key = (domain, split, kind)
        if key not in self._cache:
            if domain not in self.manifest["domains"]:
                raise ShardError(f"{self.root}: no domain {domain!r} (domains: {self.domains})")
            dtype = self.dtype if kind == "tokens" else np.int64
            path = self.root / domain / f"{split}.{kind}"
            size = path.stat().st_size
            self._cache[key] = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        return self._cache[key]

    def tokens(self, domain: str, split: str = "train") -> np.ndarray:
        return self._file(domain, split, "tokens")

    def doc_offsets(self, domain: str, split: str = "train") -> np.ndarray:
        return self._file(domain, split, "offsets")

    def doc_bytes(self, domain: str, split: str = "train") -> np.ndarray:
        return self._file(domain, split, "bytes")

    def n_tokens(self, domain: str, split: str = "train") -> int:
        return self.manifest["domains"][domain]["splits"][split]["tokens"]

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
        """The mixture table the data config gave (domain, proportion, epochs)."""
        from teleflm.data.mixture import DomainWeight

        return [
            DomainWeight(name, d["proportion"], d["epochs"]) for name, d in self.manifest["domains"].items()
        ]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def open_shards(root: str | Path, expected_tokenizer_hash: str | None = None, verify: bool = True) -> Shards:
    """Open a shards folder. Sizes are always checked against the manifest (a truncated file is
    refused), checksums too when `verify`; shards made by another tokenizer than expected are refused."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ShardError(f"{root}: no {MANIFEST} (not a finished `teleflm data prepare` output)")
    manifest = json.loads(manifest_path.read_text())
    if expected_tokenizer_hash is not None and manifest["tokenizer_hash"] != expected_tokenizer_hash:
        raise ShardError(
            f"{root} was made with another tokenizer (tokenizer.json sha256 {manifest['tokenizer_hash'][:12]}..., "
            f"configured tokenizer {expected_tokenizer_hash[:12]}...): re-run `teleflm data prepare` with it"
        )
    for domain, entry in manifest["domains"].items():
        for split in SPLITS:
            info = entry["splits"][split]
            for kind, size in info["sizes"].items():
                path = root / domain / f"{split}.{kind}"
                if not path.is_file():
                    raise ShardError(f"shard {path} is missing")
                if path.stat().st_size != size:
                    raise ShardError(
                        f"shard {path} has {path.stat().st_size} bytes, the manifest says {size}: truncated or altered"
                    )
                if verify and _sha256(path) != info["sha256"][kind]:
                    raise ShardError(
                        f"shard {path}: checksum mismatch with {manifest_path}: the file was altered or damaged"
                    )
    return Shards(root, manifest)
