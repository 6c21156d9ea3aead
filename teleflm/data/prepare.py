"""`teleflm data prepare`: raw documents per domain -> token shards with a held-out split and a manifest.

Streaming: documents are read in chunks of CHUNK_CHARS characters and written as they are encoded,
so memory stays bounded whatever the corpus size. Every core: a domain of one chunk is encoded here by
the Rust tokenizer's multithreaded `encode_batch_fast`; longer domains go chunk by chunk to worker
processes (one per core, each encoding single-threaded and turning its ids into a numpy array, the
part a single process does serially), at most two chunks per worker in flight, written in order as
they come back, so the shards are the same byte for byte however they were chunked. Atomic: a domain is written in a temporary folder and renamed when complete; the manifest
says `complete` only after the last domain, so an interrupted run leaves nothing that reads as
finished; a re-run skips the domains whose inputs, settings and tokenizer are unchanged.
"""

import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import time
import tomllib
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np

from teleflm.data.decontaminate import DEFAULT_NGRAM, NgramIndex, load_test_ngrams
from teleflm.data.shards import (
    FORMAT_VERSION,
    KINDS,
    MANIFEST,
    SPLITS,
    SplitWriter,
    read_manifest,
    token_dtype,
)
from teleflm.data.sources import COMPRESSED, DOC_SPLITS, ReadStats, read_documents
from teleflm.data.tokenizer import EOS_ID, raw_tokenizer, tokenizer_hash

CHUNK_CHARS = 1 << 20  # characters per chunk of work: many per domain, so that every worker has some


@dataclass
class DomainSource:
    name: str
    inputs: list[str]  # files or globs, relative to the data config's folder
    proportion: float = 1.0  # share of training sequences (the mixture table)
    epochs: float = 1.0  # passes over the domain the mixture may make
    text_field: str = "text"  # JSONL / Parquet field holding the text
    doc_split: str = (
        "blank_line"  # plain text: one document per "line", per "blank_line"-separated block, or per "file"
    )
    max_doc_chars: int = 0  # cut longer documents into pieces (0: never)


@dataclass
class DataConfig:
    tokenizer: str  # folder with tokenizer.json, relative to the config's folder
    out: str  # shards folder, relative to the config's folder
    domains: list[DomainSource]
    heldout_fraction: float = 0.02  # documents per domain held out for evaluation
    seed: int = 1234  # of the held-out draw


def _table(cls, raw, where: str) -> dict:
    """The keys of a TOML table for dataclass `cls`: unknown or missing keys and wrong types are
    refused, naming the file and the key; ints are accepted for floats."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    missing = [
        n for n, f in known.items() if n not in raw and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    values = dict(raw)
    for name, value in raw.items():
        kind = known[name].type
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        elif kind in (int, float, str) and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ValueError(f"{where}: {name} = {value!r} should be a {kind.__name__}")
    return values


def load_data_config(path: str | Path) -> DataConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data config {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: {e}") from None
    top = _table(DataConfig, raw, str(path))
    if not isinstance(top["domains"], list) or not top["domains"]:
        raise ValueError(f"{path}: no [[domains]]")
    domains = []
    for i, entry in enumerate(top["domains"]):
        where = f"{path}: domains[{i}]"
        source = DomainSource(**_table(DomainSource, entry, where))
        if (
            isinstance(source.inputs, str)
            or not all(isinstance(p, str) for p in source.inputs)
            or not source.inputs
        ):
            raise ValueError(f"{where}: inputs must be a non-empty list of files or globs")
        if not source.name or source.name.startswith(".") or "/" in source.name or "\\" in source.name:
            raise ValueError(f"{where}: name {source.name!r} must be a plain folder name")
        if source.doc_split not in DOC_SPLITS:
            raise ValueError(f"{where}: doc_split must be one of {DOC_SPLITS}, got {source.doc_split!r}")
        if source.proportion <= 0 or source.epochs <= 0 or source.max_doc_chars < 0:
            raise ValueError(f"{where}: proportion and epochs must be positive, max_doc_chars >= 0")
        domains.append(source)
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: domain names repeat: {names}")
    cfg = DataConfig(**{**top, "domains": domains})
    if not 0 <= cfg.heldout_fraction < 1:
        raise ValueError(f"{path}: heldout_fraction must be in [0, 1), got {cfg.heldout_fraction}")
    return cfg


def resolve_inputs(patterns: list[str], base: Path, domain: str) -> list[Path]:
    """Files of a domain, in the order of its patterns, each pattern's matches sorted."""
    files: list[Path] = []
    for pattern in patterns:
        full = pattern if os.path.isabs(pattern) else str(base / pattern)
        found = sorted(Path(p) for p in glob.glob(full, recursive=True) if Path(p).is_file())
        if not found:
            raise FileNotFoundError(f"domain {domain!r}: input {pattern!r} matches no file")
        files += [f for f in found if f not in files]
    return files


def fingerprint(
    source: DomainSource, files: list[Path], cfg: DataConfig, tok_hash: str, decontam: dict | None
) -> str:
    """What a domain's shards depend on: its settings, its files (path, size, mtime), the held-out
    draw, the tokenizer and the test set. Equal fingerprints: the shards are reused."""
    stat = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    settings = [FORMAT_VERSION, asdict(source), stat, cfg.heldout_fraction, cfg.seed, tok_hash, decontam]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def prepare(
    config_path: str | Path,
    tokenizer: str | Path | None = None,
    out: str | Path | None = None,
    decontaminate: list[str] = (),
    ngram: int = DEFAULT_NGRAM,
    decontaminate_action: str = "remove",
    progress: bool = True,
    workers: int = 0,
) -> dict:
    """Prepare every domain of a data config (`tokenizer` and `out` override the config's); returns
    the manifest. `decontaminate`: test-set files or globs whose n-grams (`ngram` tokens) mark
    training documents to "remove" or "report" (`decontaminate_action`). `workers`: encoding
    processes (0: one per core)."""
    config_path = Path(config_path)
    cfg = load_data_config(config_path)
    base = config_path.parent
    tokenizer = Path(tokenizer or base / cfg.tokenizer)
    out = Path(out or base / cfg.out)
    if decontaminate_action not in ("remove", "report"):
        raise ValueError(f"decontaminate action must be remove or report, got {decontaminate_action!r}")
    # Everything that can fail is checked before work starts.
    tok_hash = tokenizer_hash(tokenizer)
    encoder = raw_tokenizer(tokenizer)
    inputs = {d.name: resolve_inputs(d.inputs, base, d.name) for d in cfg.domains}
    test_set = load_test_ngrams(list(decontaminate), encoder, ngram) if decontaminate else None
    decontam = {**test_set.info, "action": decontaminate_action} if test_set else None

    out.mkdir(parents=True, exist_ok=True)
    try:
        manifest = read_manifest(out)
    except ValueError:
        manifest = {}
    if manifest.get("tokenizer_hash") != tok_hash:
        manifest = {"domains": {}}  # another tokenizer (or none yet): every domain is redone
    manifest.update(
        format=FORMAT_VERSION,
        complete=False,
        tokenizer=str(tokenizer),
        tokenizer_hash=tok_hash,
        vocab_size=encoder.get_vocab_size(),
        dtype=token_dtype(encoder.get_vocab_size()).name,
        eos_id=EOS_ID,
        heldout_fraction=cfg.heldout_fraction,
        seed=cfg.seed,
        decontamination=decontam,
    )
    _write_json_atomic(out / MANIFEST, manifest)
    with ChunkEncoder(encoder, tokenizer, workers) as encode:
        for source in cfg.domains:
            key = fingerprint(source, inputs[source.name], cfg, tok_hash, decontam)
            done = manifest["domains"].get(source.name)
            if done and done["fingerprint"] == key and _files_present(out / source.name, done):
                print(f"{source.name}: up to date, skipped")
                continue
            manifest["domains"].pop(source.name, None)
            _write_json_atomic(out / MANIFEST, manifest)  # the old entry goes before its folder does
            entry = prepare_domain(
                source, inputs[source.name], cfg, encode, out, test_set, decontaminate_action, progress
            )
            manifest["domains"][source.name] = {"fingerprint": key, **entry}
            _write_json_atomic(out / MANIFEST, manifest)
    # Domains no longer in the config leave the manifest and the folder.
    for name in set(manifest["domains"]) - {d.name for d in cfg.domains}:
        del manifest["domains"][name]
        shutil.rmtree(out / name, ignore_errors=True)
    manifest["domains"] = {d.name: manifest["domains"][d.name] for d in cfg.domains}
    manifest["complete"] = True
    _write_json_atomic(out / MANIFEST, manifest)
    return manifest


def prepare_domain(
    source: DomainSource,
    files: list[Path],
    cfg: DataConfig,
    encode: "ChunkEncoder",
    out: Path,
    test_set: NgramIndex | None,
    action: str,
    progress: bool,
) -> dict:
    """Encode one domain into `out/<name>` (built in a temporary folder, renamed when complete);
    returns its manifest entry, less the fingerprint."""
    from tqdm import tqdm

    started = time.time()
    dtype = encode.dtype
    tmp = out / f".{source.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writers = {split: SplitWriter(tmp, split, dtype) for split in SPLITS}
    stats = ReadStats()
    # One uniform draw per document, in reading order: the held-out split depends on the seed, the
    # domain and the documents only, not on how they are chunked.
    heldout_rng = np.random.default_rng(
        [cfg.seed, int(hashlib.sha256(source.name.encode()).hexdigest()[:8], 16)]
    )
    contaminated = 0
    sizes_known = not any(f.name.endswith(COMPRESSED) for f in files)
    bar = tqdm(
        total=sum(f.stat().st_size for f in files) if sizes_known else None,
        unit="B",
        unit_scale=True,
        desc=source.name,
        disable=not progress,
    )

    for tokens, lengths, n_bytes in encode.chunks(_chunks(files, source, stats)):
        bar.update(int(n_bytes.sum()))
        keep = np.ones(len(lengths), dtype=bool)
        if test_set is not None:
            dirty = test_set.contaminated(tokens, np.concatenate([[0], np.cumsum(lengths)]))
            contaminated += int(dirty.sum())
            if action == "remove":
                keep &= ~dirty
        heldout = heldout_rng.random(len(lengths)) < cfg.heldout_fraction
        for split, chosen in (("train", keep & ~heldout), ("val", keep & heldout)):
            if chosen.all():  # the usual case for train: the arrays as they came, no copies
                writers[split].add(tokens, lengths, n_bytes)
            else:
                writers[split].add(tokens[np.repeat(chosen, lengths)], lengths[chosen], n_bytes[chosen])
    bar.close()
    splits = {split: w.close() for split, w in writers.items()}
    shutil.rmtree(out / source.name, ignore_errors=True)
    tmp.rename(out / source.name)

    for path, count in stats.invalid_utf8.items():
        print(f"warning: {path}: {count} invalid UTF-8 sequences replaced by U+FFFD")
    for path in stats.empty_files:
        print(f"warning: {path}: no documents")
    if splits["train"]["documents"] == 0:
        warnings.warn(f"domain {source.name!r} has no training documents", stacklevel=2)
    seconds = time.time() - started
    total_bytes = splits["train"]["bytes"] + splits["val"]["bytes"]
    print(
        f"{source.name}: {splits['train']['documents']:,} documents, {splits['train']['tokens']:,} tokens "
        f"(held out: {splits['val']['documents']:,} documents); {total_bytes / max(seconds, 1e-9) / 1e6:.1f} MB/s"
    )
    return {
        "inputs": [str(f) for f in files],
        "proportion": source.proportion,
        "epochs": source.epochs,
        "splits": splits,
        "invalid_utf8": stats.invalid_utf8,
        "empty_files": stats.empty_files,
        "contaminated_documents": contaminated,
        "removed_documents": contaminated if action == "remove" and test_set is not None else 0,
        "seconds": round(seconds, 2),
    }


def encode_documents(encoder, docs: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token ids end to end in `dtype`, token count per document, UTF-8 bytes per document)."""
    ids = [e.ids for e in encoder.encode_batch_fast(docs, add_special_tokens=False)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    n_bytes = np.fromiter((len(text.encode()) for text in docs), dtype=np.int64, count=len(docs))
    return tokens, lengths, n_bytes


_worker_encoder = None  # a worker process's tokenizer


def _start_worker(tokenizer_dir: str) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker_encoder = raw_tokenizer(tokenizer_dir)


def _encode_in_worker(docs: list[str], dtype: np.dtype):
    return encode_documents(_worker_encoder, docs, dtype)


class ChunkEncoder:
    """Encodes chunks of documents, in order: a lone chunk here, longer runs on a pool of worker
    processes (started at the first run that needs it, shared by the domains of one prepare)."""

    def __init__(self, encoder, tokenizer_dir: Path, workers: int = 0):
        self.encoder, self.tokenizer_dir = encoder, tokenizer_dir
        self.dtype = token_dtype(encoder.get_vocab_size())
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.workers = workers or cores
        self.pool = None

    def __enter__(self) -> "ChunkEncoder":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def chunks(self, chunks):
        """(tokens, lengths, n_bytes) of each chunk of `chunks`, in order."""
        chunks = iter(chunks)
        first, second = next(chunks, None), next(chunks, None)
        if second is None:
            if first is not None:
                yield encode_documents(self.encoder, first, self.dtype)
            return
        if self.pool is None:
            self.pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(str(self.tokenizer_dir),),
            )
        pending = deque()
        for chunk in itertools.chain([first, second], chunks):
            pending.append(self.pool.submit(_encode_in_worker, chunk, self.dtype))
            if len(pending) >= 2 * self.workers:  # bounded memory: wait for the oldest
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _chunks(files: list[Path], source: DomainSource, stats: ReadStats):
    """Lists of documents of about CHUNK_CHARS characters, in file order."""
    chunk, chars = [], 0
    for path in files:
        for doc in read_documents(path, source.text_field, source.doc_split, source.max_doc_chars, stats):
            chunk.append(doc)
            chars += len(doc)
            if chars >= CHUNK_CHARS:
                yield chunk
                chunk, chars = [], 0
    if chunk:
        yield chunk


def _files_present(folder: Path, entry: dict) -> bool:
    """The domain's files exist with the sizes the manifest recorded (checksums are open_shards' job)."""
    return all(
        (folder / f"{split}.{kind}").is_file()
        and (folder / f"{split}.{kind}").stat().st_size == entry["splits"][split]["sizes"][kind]
        for split in SPLITS
        for kind in KINDS
    )


def _write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False))
    os.replace(tmp, path)
