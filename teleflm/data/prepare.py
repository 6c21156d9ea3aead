"""`teleflm data prepare`: raw documents per domain -> token shards with a held-out split and a manifest.

Per domain and split, three flat files: `tokens` (uint16 when the vocabulary fits, else uint32),
`offsets` (int64, documents' start positions, n_docs + 1) and `bytes` (int64, each document's UTF-8
size, for bits per byte). Input is streamed in chunks (memory stays bounded whatever the corpus size),
encoded with the Rust tokenizer's multithreaded `encode_batch` (every core). A domain is written in a
temporary folder, renamed when complete, and only then entered in `manifest.json` (itself replaced
atomically), so an interrupted run leaves nothing that reads as complete; a re-run skips the domains
whose inputs, settings and tokenizer are unchanged.
"""

import glob
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from teleflm.data.sources import ReadStats, read_documents
from teleflm.data.tokenizer import raw_tokenizer, tokenizer_hash

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
CHUNK_CHARS = 8 << 20  # characters encoded per batch


@dataclass
class DomainSource:
    name: str
    inputs: list[str]  # files or globs, relative to the data config's folder
    proportion: float = 1.0  # share of training sequences (the mixture table)
    epochs: float = 1.0  # passes over the domain the mixture may make
    text_field: str = "text"  # JSONL / Parquet column
    doc_split: str = "blank_line"  # plain text: "line", "blank_line" or "file"
    max_doc_chars: int = 0  # cut longer plain documents into pieces (0: never)


@dataclass
class DataConfig:
    tokenizer: str = ""
    out: str = ""
    heldout_fraction: float = 0.02
    seed: int = 1234
    domains: list[DomainSource] = field(default_factory=list)


def load_data_config(path: str | Path) -> DataConfig:
    import tomllib

    from teleflm.train.config import ConfigError, _build

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data config {path} does not exist")
    cfg = _build(DataConfig, tomllib.loads(path.read_text()), str(path))
    if not cfg.domains:
        raise ConfigError(f"{path}: no [[domains]]")
    names = [d.name for d in cfg.domains]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: domain names repeat: {names}")
    if not 0 <= cfg.heldout_fraction < 1:
        raise ConfigError(f"{path}: heldout_fraction must be in [0, 1)")
    return cfg


def resolve_inputs(patterns: list[str], base: Path, domain: str) -> list[Path]:
    files = []
    for pattern in patterns:
        full = pattern if os.path.isabs(pattern) else str(base / pattern)
        found = sorted(Path(p) for p in glob.glob(full, recursive=True) if Path(p).is_file())
        if not found:
            raise FileNotFoundError(f"domain {domain!r}: input {pattern!r} matches no file")
        files.extend(found)
    return files


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of every n-token window (polynomial, wrapping): equal n-grams hash equal."""
    if len(tokens) < n:
        return np.empty(0, dtype=np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(tokens.astype(np.uint64), n)
    powers = np.uint64(1_000_003) ** np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return (windows * powers).sum(axis=1, dtype=np.uint64)


class SplitWriter:
    """Appends documents to one split's three files, hashing them as they are written."""

    def __init__(self, folder: Path, split: str, dtype):
        self.paths = {kind: folder / f"{split}.{kind}" for kind in ("tokens", "offsets", "bytes")}
        self.files = {kind: path.open("wb") for kind, path in self.paths.items()}
        self.hashes = {kind: hashlib.sha256() for kind in self.paths}
        self.dtype = dtype
        self.n_tokens = self.n_docs = self.n_bytes = 0
        self._write("offsets", np.zeros(1, dtype=np.int64))

    def _write(self, kind: str, array: np.ndarray) -> None:
        data = array.tobytes()
        self.files[kind].write(data)
        self.hashes[kind].update(data)

    def add(self, ids: list[np.ndarray], sizes: list[int]) -> None:
        if not ids:
            return
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        self._write("tokens", np.concatenate(ids).astype(self.dtype))
        self._write("offsets", self.n_tokens + np.cumsum(lengths))
        self._write("bytes", np.asarray(sizes, dtype=np.int64))
        self.n_tokens += int(lengths.sum())
        self.n_docs += len(ids)
        self.n_bytes += int(sum(sizes))

    def close(self) -> dict:
        for f in self.files.values():
            f.close()
        return {
            "documents": self.n_docs,
            "tokens": self.n_tokens,
            "bytes": self.n_bytes,
            "sha256": {kind: h.hexdigest() for kind, h in self.hashes.items()},
            "sizes": {kind: path.stat().st_size for kind, path in self.paths.items()},
        }


def fingerprint(
    source: DomainSource, files: list[Path], cfg: DataConfig, tok_hash: str, decontam: dict
) -> str:
    stat = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    settings = [asdict(source), stat, cfg.heldout_fraction, cfg.seed, tok_hash, decontam]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def prepare(
    config_path: str | Path,
    tokenizer: str | Path | None = None,
    out: str | Path | None = None,
    decontaminate: list[str] = (),
    ngram: int = 13,
    decontaminate_action: str = "remove",
    progress: bool = True,
) -> dict:
    """Prepare every domain of a data config (tokenizer and out may override the config's); returns
    the manifest."""
    from tqdm import tqdm

    config_path = Path(config_path)
    cfg = load_data_config(config_path)
    base = config_path.parent
    tokenizer = Path(tokenizer or base / cfg.tokenizer)
    out = Path(out or base / cfg.out)
    if decontaminate_action not in ("remove", "report"):
        raise ValueError(f"decontaminate action must be remove or report, got {decontaminate_action!r}")
    tok_hash = tokenizer_hash(tokenizer)
    encoder = raw_tokenizer(tokenizer)
    dtype = np.uint16 if encoder.get_vocab_size() <= 2**16 else np.uint32
    # Every input is resolved before any work, so a missing file stops the run at once.
    inputs = {d.name: resolve_inputs(d.inputs, base, d.name) for d in cfg.domains}
    test_hashes, decontam = _test_ngrams(decontaminate, encoder, ngram)

    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if manifest.get("tokenizer_hash") not in (None, tok_hash):
        manifest = {}  # another tokenizer: every domain is redone
    manifest.update(
        tokenizer=str(tokenizer),
        tokenizer_hash=tok_hash,
        dtype=np.dtype(dtype).name,
        decontamination=decontam,
    )
    manifest.setdefault("domains", {})
    for source in cfg.domains:
        files = inputs[source.name]
        key = fingerprint(source, files, cfg, tok_hash, decontam)
        done = manifest["domains"].get(source.name)
        if done and done["fingerprint"] == key and (out / source.name).is_dir():
            print(f"{source.name}: up to date, skipped")
            continue
        started = time.time()
        tmp = out / f".{source.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        writers = {split: SplitWriter(tmp, split, dtype) for split in SPLITS}
        stats = ReadStats()
        contaminated = 0
        rng = np.random.default_rng([cfg.seed, int(hashlib.sha256(source.name.encode()).hexdigest()[:8], 16)])
        bar = tqdm(
            total=sum(f.stat().st_size for f in files),
            unit="B",
            unit_scale=True,
            desc=source.name,
            disable=not progress,
        )
        for chunk in _chunks(files, source, stats, bar):
            encoded = encoder.encode_batch(chunk, add_special_tokens=False)
            rows = {split: ([], []) for split in SPLITS}
            heldout = rng.random(len(chunk)) < cfg.heldout_fraction
            for text, enc, is_val in zip(chunk, encoded, heldout, strict=True):
                ids = np.asarray(enc.ids, dtype=np.int64)
                if test_hashes is not None and np.isin(ngram_hashes(ids, ngram), test_hashes).any():
                    contaminated += 1
                    if decontaminate_action == "remove":
                        continue
                split = "val" if is_val else "train"
                rows[split][0].append(ids)
                rows[split][1].append(len(text.encode()))
            for split, (ids, sizes) in rows.items():
                writers[split].add(ids, sizes)
        bar.close()
        entry = {
            "fingerprint": key,
            "inputs": [str(f) for f in files],
            "proportion": source.proportion,
            "epochs": source.epochs,
            "splits": {split: w.close() for split, w in writers.items()},
            "invalid_utf8": stats.invalid_utf8,
            "empty_files": stats.empty_files,
            "contaminated_documents": contaminated,
            "contamination_action": decontaminate_action if test_hashes is not None else None,
            "seconds": round(time.time() - started, 2),
        }
        for path, count in stats.invalid_utf8.items():
            print(f"warning: {path}: {count} invalid UTF-8 sequences replaced by U+FFFD")
        for path in stats.empty_files:
            print(f"warning: {path}: no documents")
        shutil.rmtree(out / source.name, ignore_errors=True)
        tmp.rename(out / source.name)
        manifest["domains"][source.name] = entry
        _write_json_atomic(manifest_path, manifest)
        train = entry["splits"]["train"]
        print(
            f"{source.name}: {train['documents']:,} documents, {train['tokens']:,} tokens (+ held-out {entry['splits']['val']['documents']:,} documents)"
        )
    # Domains no longer in the config leave the manifest (their folders stay until overwritten).
    manifest["domains"] = {d.name: manifest["domains"][d.name] for d in cfg.domains}
    _write_json_atomic(manifest_path, manifest)
    return manifest


def _chunks(files: list[Path], source: DomainSource, stats: ReadStats, bar):
    chunk, chars = [], 0
    for path in files:
        position = 0
        for doc in read_documents(path, source.text_field, source.doc_split, stats):
            pieces = (
                [doc[i : i + source.max_doc_chars] for i in range(0, len(doc), source.max_doc_chars)]
                if source.max_doc_chars
                else [doc]
            )
            for piece in pieces:
                chunk.append(piece)
                chars += len(piece)
                if chars >= CHUNK_CHARS:
                    yield chunk
                    chunk, chars = [], 0
            size = len(doc.encode())
            bar.update(min(size, max(path.stat().st_size - position, 0)))
            position += size
    if chunk:
        yield chunk


def _test_ngrams(paths: list[str], encoder, n: int):
    if not paths:
        return None, {}
    hashes = []
    files = [Path(p) for pattern in paths for p in sorted(glob.glob(pattern, recursive=True))]
    if not files:
        raise FileNotFoundError(f"--decontaminate {list(paths)}: no test files found")
    n_docs = 0
    for path in files:
        for doc in read_documents(path):
            hashes.append(ngram_hashes(np.asarray(encoder.encode(doc, add_special_tokens=False).ids), n))
            n_docs += 1
    info = {"test_files": [str(f) for f in files], "test_documents": n_docs, "ngram": n}
    return np.unique(np.concatenate(hashes)) if hashes else np.empty(0, np.uint64), info


def _write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)
