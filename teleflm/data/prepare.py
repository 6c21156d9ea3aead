"""`teleflm data prepare`: raw documents per domain -> token shards with a held-out split and a manifest,
on one machine or on the workers of a cluster.

A job is planned, run in stages, and merged:
- **plan** (here): the inputs are cut into parts of about `part_bytes` of raw text (whole files, or
  byte ranges of a large file of one document per line), in config order; each part becomes one part
  of its domain's shards (teleflm.data.shards), so the shards are the same whatever the number of
  workers. Parts and dedup buckets are dealt to N workers (largest first, to the least loaded).
- **scan** (with `[dedup]`): each worker reads its parts, applies the quality filters, and writes
  every kept document's exact and near-duplicate keys, sorted (teleflm.data.dedup).
- **dedup**: each worker decides its key ranges over every part's keys: one global decision.
- **encode**: each worker reads its parts again, drops filtered, duplicate and contaminated documents,
  tokenizes (ChunkEncoder: a thread per core of its machine) and writes its parts' shard files.
- **merge** (one process, reads only the small per-part records): the manifest.
Each task writes its output, then a record of it (with a fingerprint of everything it depends on),
atomically; a rerun skips every task whose record matches, so a failed worker is rerun alone and
finished work is never redone, and a changed input redoes only what depends on it. Every stage holds
a few chunks of documents, never the corpus: memory per worker does not grow with the corpus.

The stages run here, in N local processes (`run_local`), or as Slurm job arrays
(teleflm.data.cluster); every engine runs the same command per worker (`worker_command`).
"""

import glob
import hashlib
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from teleflm.config import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, ConfigError, build, read_toml
from teleflm.data import dedup
from teleflm.data.decontaminate import DEFAULT_NGRAM, MIN_ITEM_TOKENS, NgramIndex, load_test_ngrams
from teleflm.data.dedup import DedupConfig
from teleflm.data.mixture import DomainWeight
from teleflm.data.quality import FILTERS, FilterConfig, QualityFilter, words
from teleflm.data.shards import (
    FORMAT_VERSION,
    KINDS,
    MANIFEST,
    SPLITS,
    SplitWriter,
    part_file,
    read_manifest,
    split_entry,
    token_dtype,
)
from teleflm.data.sources import DOC_SPLITS, ReadStats, read_documents, splits_by_range
from teleflm.data.tokenizer import EOS_ID, raw_tokenizer, tokenizer_hash

# Characters per chunk of work. Small: on 2 cores, two encoding threads over 1 MiB chunks ran at 0.8x
# one encode_batch_fast call over all the documents, and over 16 KiB chunks at 1.35x (a chunk's
# encodings stay in cache, and a part's last chunk leaves a core idle for less); in prepare, 4 KiB
# chunks cost more in its own per-chunk work than they gained (docs/data.md, Speed).
CHUNK_CHARS = 1 << 14
JOB = ".job"  # the job's records, in the shards folder
PARALLELISM = "TOKENIZERS_PARALLELISM"  # the tokenizers library's switch for its own threads
PLAN = "plan.json"
REPORT = "dedup_examples.json"
SNIPPET_CHARS = 600  # of each document shown in the dedup report


@dataclass(kw_only=True)
class DomainSource(DomainWeight):
    """A data config's `[[domains]]` entry: its mixture weight, where its text is and how it is read,
    and its `[domains.filters]`."""

    proportion: float = 1.0  # share of training sequences (the mixture table)
    inputs: list[str]  # files or globs, relative to the data config's folder
    text_field: str = "text"  # JSONL / Parquet field holding the text
    # plain text: one document per "line", per "blank_line"-separated block, or per "file"
    doc_split: Literal[DOC_SPLITS] = "blank_line"
    max_doc_chars: int = 0  # cut longer documents into pieces (0: never)
    filters: FilterConfig = field(default_factory=FilterConfig)  # the `[domains.filters]` table

    RANGES = {**DomainWeight.RANGES, "max_doc_chars": NON_NEGATIVE}


@dataclass
class DataConfig:
    tokenizer: str  # folder with tokenizer.json, relative to the config's folder
    out: str  # shards folder, relative to the config's folder
    domains: list[DomainSource]
    heldout_fraction: float = 0.02  # documents per domain held out for evaluation
    seed: int = 1234  # of the held-out draw
    part_bytes: int = 1 << 30  # raw text per part: the unit of work of one worker, one part of the shards
    dedup: DedupConfig = field(default_factory=DedupConfig)  # the `[dedup]` table

    RANGES = dict(heldout_fraction=FRACTION, seed=NON_NEGATIVE, part_bytes=AT_LEAST_ONE)


def load_data_config(path: str | Path) -> DataConfig:
    """A data config, checked in full (teleflm.config's reader and builder, then what a table's
    types and ranges cannot say: folder names, non-empty inputs, repeated domains), every error
    naming the file and the key."""
    where = str(path)
    cfg = build(DataConfig, read_toml(path), where)
    if not cfg.domains:
        raise ConfigError(f"{where}: no [[domains]]")
    for i, source in enumerate(cfg.domains):
        at = f"{where}.domains[{i}]"
        if not source.inputs:
            raise ConfigError(f"{at}.inputs must be a non-empty list of files or globs")
        if not source.name or source.name.startswith(".") or "/" in source.name or "\\" in source.name:
            raise ConfigError(f"{at}.name {source.name!r} must be a plain folder name")
    names = [d.name for d in cfg.domains]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: domain names repeat: {names}")
    if len(cfg.domains) > 1 << dedup._DOMAIN_BITS:
        raise ConfigError(f"{where}: at most {1 << dedup._DOMAIN_BITS} domains")
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


def plan_parts(files: list[Path], source: DomainSource, part_bytes: int) -> list[list[list]]:
    """The parts of a domain: lists of pieces [file, start, end] (end None: to the end of the file),
    consecutive in file order, each part about `part_bytes` of input. A file larger than that is cut
    into byte ranges when it is read line by line (`splits_by_range`), else it is a part of its own."""
    parts: list[list[list]] = []
    current: list[list] = []
    size = 0
    for path in files:
        length = path.stat().st_size
        if length > part_bytes and splits_by_range(path, source.doc_split):
            if current:
                parts.append(current)
                current, size = [], 0
            for start in range(0, length, part_bytes):
                end = min(start + part_bytes, length)
                parts.append([[str(path), start, end if end < length else None]])
            continue
        current.append([str(path), 0, None])
        size += length
        if size >= part_bytes:
            parts.append(current)
            current, size = [], 0
    if current or not parts:
        parts.append(current)
    return parts


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _deal(sizes: list[int], jobs: int) -> list[list[int]]:
    """Task indices per worker: largest task first, each to the least loaded worker (ties: the lowest)."""
    load, out = [0] * jobs, [[] for _ in range(jobs)]
    for task in sorted(range(len(sizes)), key=lambda t: (-sizes[t], t)):
        worker = min(range(jobs), key=lambda w: (load[w], w))
        out[worker].append(task)
        load[worker] += sizes[task]
    return [sorted(tasks) for tasks in out]


def _save_test_set(job: Path, test_set: NgramIndex, action: str) -> dict:
    """The test set's n-grams saved in the job (every worker reads them); the plan's record of them."""
    shutil.rmtree(job / "test_ngrams", ignore_errors=True)
    test_set.save(job / "test_ngrams")
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(h).tobytes() for h in test_set.hashes.values()))
    return {**test_set.info, "action": action, "digest": digest.hexdigest()}


def _plan_domain(source: DomainSource, files: list[Path], part_bytes: int) -> dict:
    """A domain in the plan: its settings, its files' sizes and times (a changed file is redone), its
    parts."""
    stats = {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    return {
        "name": source.name,
        "source": asdict(source),
        "files": stats,
        "parts": plan_parts(files, source, part_bytes),
    }


def _part_size(domain: dict, p: int) -> int:
    """Bytes of input in part `p` of a planned domain (a piece without an end runs to its file's end)."""
    return sum(
        (domain["files"][path][0] if end is None else end) - start for path, start, end in domain["parts"][p]
    )


def plan_job(
    config_path: str | Path,
    tokenizer: str | Path | None = None,
    out: str | Path | None = None,
    decontaminate: list[str] = (),
    test_items: dict[str, list[str]] | None = None,
    ngram: int = DEFAULT_NGRAM,
    min_item_tokens: int = MIN_ITEM_TOKENS,
    decontaminate_action: str = "remove",
    jobs: int = 1,
    engine: str = "local",
) -> Path:
    """Check everything that can fail before work starts, cut the inputs into parts, deal the tasks to
    `jobs` workers, and write the job's plan (and the test set's n-grams) into `out/.job/`; returns that
    folder. The manifest is marked incomplete until the merge."""
    config_path = Path(config_path)
    cfg = load_data_config(config_path)
    base = config_path.parent
    tokenizer = Path(tokenizer or base / cfg.tokenizer)
    out = Path(out or base / cfg.out)
    if decontaminate_action not in ("remove", "report"):
        raise ValueError(f"decontaminate action must be remove or report, got {decontaminate_action!r}")
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    tok_hash = tokenizer_hash(tokenizer)
    encoder = raw_tokenizer(tokenizer)
    inputs = {d.name: resolve_inputs(d.inputs, base, d.name) for d in cfg.domains}
    test_set = None
    if decontaminate or test_items:
        test_set = load_test_ngrams(
            list(decontaminate), encoder, ngram, items=test_items, min_item_tokens=min_item_tokens
        )
    job = out / JOB
    job.mkdir(parents=True, exist_ok=True)
    decontam = _save_test_set(job, test_set, decontaminate_action) if test_set is not None else None
    try:
        previous = list(read_manifest(out).get("domains", {}))
    except ValueError:
        previous = []
    domains = [_plan_domain(source, inputs[source.name], cfg.part_bytes) for source in cfg.domains]
    encode_tasks = [[d, p] for d, domain in enumerate(domains) for p in range(len(domain["parts"]))]
    sizes = [_part_size(domains[d], p) for d, p in encode_tasks]
    stages = ["scan", "dedup", "encode"] if cfg.dedup.enabled else ["encode"]
    buckets = cfg.dedup.buckets or 4 * jobs
    plan = {
        "run": uuid.uuid4().hex,
        "config": str(config_path),
        "out": str(out.resolve()),
        "tokenizer": str(tokenizer),
        "tokenizer_hash": tok_hash,
        "vocab_size": encoder.get_vocab_size(),
        "heldout_fraction": cfg.heldout_fraction,
        "seed": cfg.seed,
        "part_bytes": cfg.part_bytes,
        "dedup": asdict(cfg.dedup) if cfg.dedup.enabled else None,
        "buckets": buckets if cfg.dedup.enabled else 0,
        "decontamination": decontam,
        "domains": domains,
        "previous_domains": previous,
        "stages": stages,
        "jobs": jobs,
        "engine": engine,
        "tasks": {"scan": encode_tasks, "encode": encode_tasks, "dedup": list(range(buckets))},
        "sizes": {"scan": sizes, "encode": sizes, "dedup": [1] * buckets},
    }
    plan["assignment"] = {stage: _deal(plan["sizes"][stage], jobs) for stage in ("scan", "dedup", "encode")}
    _write_json_atomic(job / PLAN, plan)
    manifest = {
        "format": FORMAT_VERSION,
        "complete": False,
        "tokenizer": str(tokenizer),
        "tokenizer_hash": tok_hash,
    }
    _write_json_atomic(out / MANIFEST, manifest)
    return job


def read_plan(job: Path) -> dict:
    path = Path(job) / PLAN
    if not path.is_file():
        raise FileNotFoundError(f"{job}: no {PLAN}: not a `teleflm data prepare` job folder")
    return json.loads(path.read_text())


def _task_name(stage: str, task) -> str:
    return f"{task:05d}" if stage == "dedup" else f"{task[0]:03d}-{task[1]:05d}"


def _record(job: Path, stage: str, task) -> Path:
    return job / stage / f"{_task_name(stage, task)}.json"


def _done(job: Path, stage: str, task, fingerprint: str) -> dict | None:
    """The task's record if it finished with this fingerprint (its outputs are then in place)."""
    path = _record(job, stage, task)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("fingerprint") == fingerprint else None


def _read_settings(plan: dict, d: int) -> dict:
    source = plan["domains"][d]["source"]
    return {k: source[k] for k in ("text_field", "doc_split", "max_doc_chars")}


def _piece_stats(plan: dict, d: int, p: int) -> list:
    files = plan["domains"][d]["files"]
    return [[path, start, end, files[path]] for path, start, end in plan["domains"][d]["parts"][p]]


def _scan_fingerprint(plan: dict, d: int, p: int) -> str:
    settings = {k: v for k, v in plan["dedup"].items() if k not in ("examples", "buckets")}
    filters = plan["domains"][d]["source"]["filters"]
    return _digest(["scan", d, p, _piece_stats(plan, d, p), _read_settings(plan, d), filters, settings])


def _part_documents(plan: dict, d: int, p: int, stats: ReadStats):
    """(document, its file) of part p of domain d, in order."""
    settings = _read_settings(plan, d)
    for path, start, end in plan["domains"][d]["parts"][p]:
        for doc in read_documents(
            Path(path),
            settings["text_field"],
            settings["doc_split"],
            settings["max_doc_chars"],
            stats,
            start,
            end,
        ):
            yield doc, path


class Progress:
    """One worker's progress in one stage, in `.job/progress/` (what `teleflm data progress` and the
    local engine read), written at most once a second; optionally a progress bar here too."""

    def __init__(self, job: Path, stage: str, worker: int, tasks: int, total_bytes: int, bar: bool):
        self.path = job / "progress" / f"{stage}-{worker:05d}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.state = {
            "stage": stage,
            "worker": worker,
            "tasks": tasks,
            "tasks_done": 0,
            "documents": 0,
            "bytes": 0,
            "bytes_total": total_bytes,
            "started": time.time(),
            "finished": None,
        }
        self.written = 0.0
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=stage)
        self.write(force=True)

    def add(self, documents: int, n_bytes: int) -> None:
        self.state["documents"] += documents
        self.state["bytes"] += n_bytes
        if self.bar is not None:
            self.bar.update(n_bytes)
        self.write()

    def task_done(self) -> None:
        self.state["tasks_done"] += 1
        self.write(force=True)

    def close(self) -> None:
        self.state["finished"] = time.time()
        self.write(force=True)
        if self.bar is not None:
            self.bar.close()

    def write(self, force: bool = False) -> None:
        now = time.time()
        if force or now - self.written >= 1.0:
            _write_json_atomic(self.path, {**self.state, "updated": now})
            self.written = now


def run_worker(job: str | Path, stage: str, worker: int, workers: int = 0, progress: bool = False) -> None:
    """Run worker `worker`'s tasks of one stage (what one Slurm array task or local process does):
    each task whose record matches is skipped. `workers`: encoding threads (0: one per core)."""
    job = Path(job)
    plan = read_plan(job)
    if stage not in plan["stages"]:
        raise ValueError(f"{job}: this job has no stage {stage!r} (stages: {plan['stages']})")
    if not 0 <= worker < plan["jobs"]:
        raise ValueError(f"worker {worker} is not one of the job's {plan['jobs']} (0 .. {plan['jobs'] - 1})")
    mine = plan["assignment"][stage][worker]
    tasks = [plan["tasks"][stage][t] for t in mine]
    total = sum(plan["sizes"][stage][t] for t in mine) if stage != "dedup" else len(mine)
    (job / stage).mkdir(exist_ok=True)
    meter = Progress(job, stage, worker, len(tasks), total, progress)
    if stage == "scan":
        signer = dedup.Signer(DedupConfig(**plan["dedup"]))
        for d, p in tasks:
            _scan_part(job, plan, d, p, signer, worker, meter)
            meter.task_done()
    elif stage == "dedup":
        for bucket in tasks:
            _dedup_bucket(job, plan, bucket, worker)
            meter.add(0, 1)
            meter.task_done()
    else:
        decontam = plan["decontamination"]
        test_set = NgramIndex.load(job / "test_ngrams", decontam["ngram"], decontam) if decontam else None
        examples = (
            dedup.report_examples(_bucket_folders(job, plan), plan["dedup"]["examples"])
            if plan["dedup"]
            else []
        )
        encoder = raw_tokenizer(plan["tokenizer"])
        with ChunkEncoder(encoder, workers) as encode:
            _encode_parts(job, plan, tasks, encode, test_set, examples, worker, meter)
    meter.close()


def _scan_part(job: Path, plan: dict, d: int, p: int, signer, worker: int, meter: Progress) -> None:
    """Filter verdicts and dedup keys of one part."""
    key = _scan_fingerprint(plan, d, p)
    size = plan["sizes"]["scan"][plan["tasks"]["scan"].index([d, p])]
    if _done(job, "scan", [d, p], key):
        meter.add(0, size)
        return
    started = time.time()
    _record(job, "scan", [d, p]).unlink(missing_ok=True)
    folder = job / "scan" / _task_name("scan", [d, p])
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = signer.config
    quality = QualityFilter(FilterConfig(**plan["domains"][d]["source"]["filters"]))
    stats = ReadStats()
    dropped, reasons = [], []
    exact_keys, exact_docs, near_keys, near_docs = [], [], [], []
    n_docs = n_bytes = 0
    for i, (doc, _) in enumerate(_part_documents(plan, d, p, stats)):
        n_docs += 1
        size_i = len(doc.encode())
        n_bytes += size_i
        tokens = words(doc)
        verdict = quality.verdict(doc, tokens)
        if verdict is not None:
            dropped.append(i)
            reasons.append(FILTERS.index(verdict))
        else:
            if config.exact:
                exact_keys.append(dedup.exact_key(doc))
                exact_docs.append(i)
            if config.near and (keys := signer.near_keys(tokens)) is not None:
                near_keys.append(keys)
                near_docs.append(np.full(len(keys), i, dtype=np.int64))
        if n_docs % 1024 == 0:
            meter.add(1024, 0)
    meter.add(n_docs % 1024, size)

    def scoped(keys: np.ndarray) -> np.ndarray:
        return dedup.scope(keys, d, config.across_domains)

    exact = [scoped(np.array(exact_keys, dtype=np.uint64))] if exact_keys else []
    near = [scoped(np.concatenate(near_keys))] if near_keys else []
    dedup.write_keys(
        folder, dedup.EXACT, exact, [dedup.position(d, p, np.array(exact_docs))] if exact else []
    )
    dedup.write_keys(
        folder, dedup.NEAR, near, [dedup.position(d, p, np.concatenate(near_docs))] if near else []
    )
    np.save(folder / "dropped.npy", np.array(dropped, dtype=np.int64))
    np.save(folder / "reasons.npy", np.array(reasons, dtype=np.uint8))
    record = {
        "fingerprint": key,
        "worker": worker,
        "run": plan["run"],
        "documents": n_docs,
        "bytes": n_bytes,
        "seconds": round(time.time() - started, 3),
        "filtered": _count(reasons),
        "invalid_utf8": stats.invalid_utf8,
        "documents_per_file": stats.documents,
    }
    _write_json_atomic(_record(job, "scan", [d, p]), record)


def _count(reasons: list[int]) -> dict[str, int]:
    counts = np.bincount(np.asarray(reasons, dtype=np.int64), minlength=len(FILTERS))
    return {name: int(counts[i]) for i, name in enumerate(FILTERS) if counts[i]}


def _bucket_folders(job: Path, plan: dict) -> list[Path]:
    return [job / "dedup" / _task_name("dedup", b) for b in range(plan["buckets"])]


def _scan_folders(job: Path, plan: dict) -> list[Path]:
    return [job / "scan" / _task_name("scan", task) for task in plan["tasks"]["scan"]]


def _dedup_fingerprint(plan: dict, bucket: int) -> str:
    scans = [_scan_fingerprint(plan, d, p) for d, p in plan["tasks"]["scan"]]
    return _digest(["dedup", bucket, plan["buckets"], plan["dedup"], scans])


def _dedup_bucket(job: Path, plan: dict, bucket: int, worker: int) -> None:
    key = _dedup_fingerprint(plan, bucket)
    if _done(job, "dedup", bucket, key):
        return
    started = time.time()
    missing = [t for t in plan["tasks"]["scan"] if not _done(job, "scan", t, _scan_fingerprint(plan, *t))]
    if missing:
        raise RuntimeError(f"{job}: dedup needs every scan first; parts not scanned: {missing[:5]}")
    _record(job, "dedup", bucket).unlink(missing_ok=True)
    kinds = [
        k for k, on in ((dedup.EXACT, plan["dedup"]["exact"]), (dedup.NEAR, plan["dedup"]["near"])) if on
    ]
    decision = dedup.decide(_scan_folders(job, plan), bucket, plan["buckets"], kinds)
    folder = job / "dedup" / _task_name("dedup", bucket)
    shutil.rmtree(folder, ignore_errors=True)
    dedup.save_decision(folder, decision, plan["dedup"]["examples"])
    record = {
        "fingerprint": key,
        "worker": worker,
        "run": plan["run"],
        "removed": len(decision["removed"]),
        "seconds": round(time.time() - started, 3),
    }
    _write_json_atomic(_record(job, "dedup", bucket), record)


def _encode_fingerprint(plan: dict, d: int, p: int, removed: np.ndarray, wanted: list) -> str:
    domain = plan["domains"][d]
    upstream = (
        _scan_fingerprint(plan, d, p)
        if plan["dedup"]
        else [_piece_stats(plan, d, p), _read_settings(plan, d), domain["source"]["filters"]]
    )
    removal = hashlib.sha256(np.ascontiguousarray(removed).tobytes()).hexdigest()
    settings = [plan["tokenizer_hash"], plan["heldout_fraction"], plan["seed"], plan["decontamination"]]
    return _digest(["encode", FORMAT_VERSION, domain["name"], p, upstream, settings, removal, wanted])


class PartDocuments:
    """The documents of one part that reach the tokenizer, in chunks of about CHUNK_CHARS: those the
    quality filters, dedup and decontamination keep, each drawn into train or val (`handed_out` holds each
    chunk's (held-out flags, UTF-8 bytes per document), in the order the chunks were handed out), with
    the counts of what was read and dropped and the dedup report's snippets."""

    def __init__(self, job: Path, plan: dict, d: int, p: int, wanted: list, meter, stats: ReadStats):
        domain = plan["domains"][d]
        self.plan, self.d, self.p, self.meter, self.stats = plan, d, p, meter, stats
        self.name = domain["name"]
        self.lo, hi = dedup.part_range(d, p)
        if plan["dedup"]:  # the scan stage filtered and signed; dedup decided the removals
            self.removed, self.removed_kind = dedup.removed_in_part(_bucket_folders(job, plan), d, p)
            folder = job / "scan" / _task_name("scan", [d, p])
            self.dropped, self.reasons = np.load(folder / "dropped.npy"), np.load(folder / "reasons.npy")
            self.quality = None
        else:
            self.removed, self.removed_kind = np.empty(0, np.int64), np.empty(0, np.uint8)
            self.dropped = self.reasons = None
            self.quality = QualityFilter(FilterConfig(**domain["source"]["filters"]))
        self.snippet_positions = {pos for row in wanted for pos in row[:2] if self.lo <= pos < hi}
        self.snippets: dict[str, dict] = {}
        self.counts = {"documents": 0, "bytes": 0, "filtered": [], "exact": 0, "near": 0}
        self.handed_out: deque = deque()

    def removal_key(self) -> np.ndarray:
        return np.stack([self.removed, self.removed_kind.astype(np.int64)])

    def chunks(self):
        # One uniform draw per document read, in reading order, from a generator of the seed, the
        # domain and the part: the split depends on the documents only, not on the workers, the
        # chunking, or which documents the filters and dedup drop.
        plan, counts = self.plan, self.counts
        rng = np.random.default_rng(
            [plan["seed"], int(hashlib.sha256(self.name.encode()).hexdigest()[:8], 16), self.p]
        )
        chunk, held, sizes, chars = [], [], [], 0
        draws = np.empty(0)
        self.drop_at = self.removed_at = 0
        for i, (doc, path) in enumerate(_part_documents(plan, self.d, self.p, self.stats)):
            if i % 4096 == 0:  # draws in blocks: the same sequence as one at a time
                draws = rng.random(4096)
            counts["documents"] += 1
            size = len(doc.encode())
            counts["bytes"] += size
            if counts["documents"] % 1024 == 0:
                self.meter.add(1024, 0)
            pos = int(self.lo) + i
            if pos in self.snippet_positions:
                self.snippets[str(pos)] = {"domain": self.name, "file": path, "text": doc[:SNIPPET_CHARS]}
            if self.dropped_here(i, doc):
                continue
            chunk.append(doc)
            held.append(draws[i % 4096] < plan["heldout_fraction"])
            sizes.append(size)
            chars += len(doc)
            if chars >= CHUNK_CHARS:
                self.handed_out.append((np.array(held, dtype=bool), np.array(sizes, dtype=np.int64)))
                yield chunk
                chunk, held, sizes, chars = [], [], [], 0
        if chunk:
            self.handed_out.append((np.array(held, dtype=bool), np.array(sizes, dtype=np.int64)))
            yield chunk

    def dropped_here(self, i: int, doc: str) -> bool:
        """Whether document `i` of the part is filtered or a duplicate (counted by reason or kind);
        called in order of `i`."""
        if self.quality is not None:
            verdict = self.quality.verdict(doc)
            if verdict is not None:
                self.counts["filtered"].append(FILTERS.index(verdict))
                return True
        else:
            while self.drop_at < len(self.dropped) and self.dropped[self.drop_at] < i:
                self.drop_at += 1
            if self.drop_at < len(self.dropped) and self.dropped[self.drop_at] == i:
                self.counts["filtered"].append(int(self.reasons[self.drop_at]))
                return True
        while self.removed_at < len(self.removed) and self.removed[self.removed_at] < i:
            self.removed_at += 1
        if self.removed_at < len(self.removed) and self.removed[self.removed_at] == i:
            self.counts[dedup.KINDS[int(self.removed_kind[self.removed_at])]] += 1
            return True
        return False


class EncodedPart:
    """One part of one domain's shards: its documents less the filtered, duplicate and contaminated
    ones, tokenized, each drawn into train or val. `documents` hands its chunks to the encoder; each
    encoded chunk comes back, in order, to `add`; `finish` puts the files in place and records the part.
    `done`: its record matches, nothing to do."""

    def __init__(
        self, job: Path, plan: dict, d: int, p: int, dtype: np.dtype, test_set, examples, worker, meter
    ):
        self.job, self.plan, self.d, self.p, self.dtype = job, plan, d, p, dtype
        self.test_set, self.worker, self.meter = test_set, worker, meter
        self.name = plan["domains"][d]["name"]
        self.size = plan["sizes"]["encode"][plan["tasks"]["encode"].index([d, p])]
        lo, hi = dedup.part_range(d, p)
        wanted = [[r, k, t] for r, k, t in examples if lo <= r < hi or lo <= k < hi]
        self.stats = ReadStats()
        self.documents = PartDocuments(job, plan, d, p, wanted, meter, self.stats)
        self.key = _encode_fingerprint(plan, d, p, self.documents.removal_key(), wanted)
        self.done = _done(job, "encode", [d, p], self.key) is not None
        self.action = plan["decontamination"]["action"] if plan["decontamination"] else None
        self.contaminated = 0

    def start(self) -> None:
        self.started = time.time()
        _record(self.job, "encode", [self.d, self.p]).unlink(missing_ok=True)
        self.tmp = Path(self.plan["out"]) / self.name / f".part-{self.p:05d}.tmp"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.writers = {split: SplitWriter(self.tmp, split, self.p, self.dtype) for split in SPLITS}

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        heldout, n_bytes = self.documents.handed_out.popleft()
        keep = np.ones(len(lengths), dtype=bool)
        if self.test_set is not None:
            dirty = self.test_set.contaminated(tokens, np.concatenate([[0], np.cumsum(lengths)]))
            self.contaminated += int(dirty.sum())
            if self.action == "remove":
                keep &= ~dirty
        for split, chosen in (("train", keep & ~heldout), ("val", keep & heldout)):
            if chosen.all():  # the usual case for train: the arrays as they came, no copies
                self.writers[split].add(tokens, lengths, n_bytes)
            else:
                self.writers[split].add(tokens[np.repeat(chosen, lengths)], lengths[chosen], n_bytes[chosen])

    def finish(self) -> None:
        counts, out = self.documents.counts, Path(self.plan["out"]) / self.name
        self.meter.add(counts["documents"] % 1024, self.size)
        splits = {split: w.close() for split, w in self.writers.items()}
        for split in SPLITS:  # into place, file by file; the record below is what says the part is done
            for kind in KINDS:
                os.replace(part_file(self.tmp, split, self.p, kind), part_file(out, split, self.p, kind))
        self.tmp.rmdir()
        record = {
            "fingerprint": self.key,
            "worker": self.worker,
            "run": self.plan["run"],
            "documents": counts["documents"],
            "bytes": counts["bytes"],
            "seconds": round(time.time() - self.started, 3),
            "splits": splits,
            "filtered": _count(counts["filtered"]),
            "deduplicated": {"exact": counts["exact"], "near": counts["near"]},
            "contaminated_documents": self.contaminated,
            "removed_documents": self.contaminated if self.action == "remove" else 0,
            "invalid_utf8": self.stats.invalid_utf8,
            "documents_per_file": self.stats.documents,
            "snippets": self.documents.snippets,
        }
        _write_json_atomic(_record(self.job, "encode", [self.d, self.p]), record)
        self.meter.task_done()


def _encode_parts(
    job: Path, plan: dict, tasks: list, encode: "ChunkEncoder", test_set, examples, worker, meter
) -> None:
    """A worker's parts, encoded as one stream of chunks: the encoders go on to the next part's
    documents while this one's last chunks are written. Parts are opened one at a time, as the stream
    reaches them."""

    def chunks():
        for d, p in tasks:
            part = EncodedPart(job, plan, d, p, encode.dtype, test_set, examples, worker, meter)
            if part.done:
                meter.add(0, part.size)
                meter.task_done()
                continue
            part.start()
            for chunk in part.documents.chunks():
                yield part, chunk
            yield part, None  # the part's end, in order with its chunks

    for part, encoded in encode.encoded(chunks()):
        if encoded is None:
            part.finish()
        else:
            part.add(*encoded)


def _domain_entry(domain: dict, records: list[dict]) -> dict:
    """A domain's manifest entry, summed from the records of its encoded parts."""
    source = domain["source"]
    per_file: dict[str, int] = {}
    invalid: dict[str, int] = {}
    for record in records:
        for path, count in record["documents_per_file"].items():
            per_file[path] = per_file.get(path, 0) + count
        for path, count in record["invalid_utf8"].items():
            invalid[path] = invalid.get(path, 0) + count
    filtered = {f: sum(r["filtered"].get(f, 0) for r in records) for f in FILTERS}
    return {
        "inputs": list(domain["files"]),
        "proportion": source["proportion"],
        "epochs": source["epochs"],
        "parts": len(records),
        "documents_read": sum(r["documents"] for r in records),
        "splits": {split: split_entry([r["splits"][split] for r in records]) for split in SPLITS},
        "invalid_utf8": invalid,
        "empty_files": [path for path, count in per_file.items() if count == 0],
        "filtered": {f: n for f, n in filtered.items() if n},
        "deduplicated": {kind: sum(r["deduplicated"][kind] for r in records) for kind in dedup.KINDS},
        "contaminated_documents": sum(r["contaminated_documents"] for r in records),
        "removed_documents": sum(r["removed_documents"] for r in records),
        "seconds": round(sum(r["seconds"] for r in records), 2),
    }


def merge(job: str | Path, verbose: bool = True) -> dict:
    """The manifest of a job whose parts are all encoded, from their records (no data is read);
    removes the parts and domains the job no longer has, and writes the dedup report."""
    job = Path(job)
    plan = read_plan(job)
    out = Path(plan["out"])
    records = {}
    missing = []
    for d, p in plan["tasks"]["encode"]:
        path = _record(job, "encode", [d, p])
        if path.is_file():
            records[d, p] = json.loads(path.read_text())
        else:
            worker = next(
                w
                for w, tasks in enumerate(plan["assignment"]["encode"])
                if plan["tasks"]["encode"].index([d, p]) in tasks
            )
            missing.append(f"{plan['domains'][d]['name']} part {p} (worker {worker})")
    if missing:
        raise RuntimeError(f"{job}: cannot merge, parts not encoded yet: {', '.join(missing[:10])}")
    domains = {}
    for d, domain in enumerate(plan["domains"]):
        name = domain["name"]
        mine = [records[d, p] for p in range(len(domain["parts"]))]
        domains[name] = entry = _domain_entry(domain, mine)
        _remove_stale_parts(out / name, len(mine))
        if verbose:
            _report_domain(name, entry, mine, plan["run"])
    for name in set(plan["previous_domains"]) - set(domains):  # domains no longer in the config
        shutil.rmtree(out / name, ignore_errors=True)
    manifest = {
        "format": FORMAT_VERSION,
        "complete": False,
        "tokenizer": plan["tokenizer"],
        "tokenizer_hash": plan["tokenizer_hash"],
        "vocab_size": plan["vocab_size"],
        "dtype": token_dtype(plan["vocab_size"]).name,
        "eos_id": EOS_ID,
        "heldout_fraction": plan["heldout_fraction"],
        "seed": plan["seed"],
        "part_bytes": plan["part_bytes"],
        "decontamination": plan["decontamination"],
        "dedup": _dedup_summary(job, plan, records, out),
        "job": _job_figures(job, plan, records),
        "domains": domains,
    }
    for name, entry in domains.items():
        for warning in _domain_warnings(name, entry):
            print(warning)
        if entry["splits"]["train"]["documents"] == 0:
            warnings.warn(f"domain {name!r} has no training documents", stacklevel=2)
    _write_json_atomic(out / MANIFEST, manifest)
    manifest["complete"] = True
    _write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _domain_warnings(name: str, entry: dict) -> list[str]:
    return [
        f"warning: {path}: {count} invalid UTF-8 sequences replaced by U+FFFD"
        for path, count in entry["invalid_utf8"].items()
    ] + [f"warning: {path}: no documents" for path in entry["empty_files"]]


def _report_domain(name: str, entry: dict, records: list[dict], run: str) -> None:
    if all(r["run"] != run for r in records):
        print(f"{name}: up to date, skipped")
        return
    train, val = entry["splits"]["train"], entry["splits"]["val"]
    seconds = sum(r["seconds"] for r in records if r["run"] == run)
    done = sum(r["bytes"] for r in records if r["run"] == run)
    dropped = sum(entry["filtered"].values()) + sum(entry["deduplicated"].values())
    print(
        f"{name}: {train['documents']:,} documents, {train['tokens']:,} tokens (held out: {val['documents']:,} "
        f"documents; dropped {dropped:,}, contaminated {entry['contaminated_documents']:,}); "
        f"{done / max(seconds, 1e-9) / 1e6:.1f} MB/s"
    )


def _remove_stale_parts(folder: Path, parts: int) -> None:
    """Files of parts past the job's last, from an earlier run with more parts, and partial folders."""
    if not folder.is_dir():
        return
    expected = {
        part_file(folder, split, p, kind).name for split in SPLITS for p in range(parts) for kind in KINDS
    }
    for path in folder.iterdir():
        if path.name not in expected:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _dedup_summary(job: Path, plan: dict, records: dict, out: Path) -> dict | None:
    if not plan["dedup"]:
        return None
    config = DedupConfig(**plan["dedup"])
    signer = dedup.Signer(config) if config.near else None
    snippets = {pos: s for r in records.values() for pos, s in r["snippets"].items()}
    report = []
    for removed, kept, kind in dedup.report_examples(_bucket_folders(job, plan), config.examples):
        report.append(
            {"kind": dedup.KINDS[kind], "removed": snippets[str(removed)], "kept": snippets[str(kept)]}
        )
    (out / REPORT).write_text(json.dumps(report, indent=1, ensure_ascii=False))
    totals = {kind: sum(r["deduplicated"][kind] for r in records.values()) for kind in dedup.KINDS}
    lsh = {"bands": signer.bands, "rows": signer.rows} if signer else {}
    return {**plan["dedup"], **lsh, "removed": totals, "report": REPORT}


def removals(job: str | Path) -> list[tuple[str, str, str]]:
    """Every document a finished dedup stage removed, in shards order, with the earlier document it
    duplicates and the kind: (removed text, kept text, "exact" or "near"). Reads the parts again."""
    job = Path(job)
    plan = read_plan(job)
    best: dict[int, tuple[int, int]] = {}  # removed -> (kind, kept): exact first, then the earliest
    for folder in _bucket_folders(job, plan):
        arrays = (np.load(folder / f"{name}.npy").tolist() for name in ("removed", "kept", "kind"))
        for removed, kept, kind in zip(*arrays, strict=True):
            best[removed] = min(best.get(removed, (kind, kept)), (kind, kept))
    wanted = set(best) | {kept for _, kept in best.values()}
    parts = {dedup.unpack(pos)[:2] for pos in wanted}
    text = {}
    for d, p in sorted(parts):
        lo = int(dedup.part_range(d, p)[0])
        for i, (doc, _) in enumerate(_part_documents(plan, d, p, ReadStats())):
            if lo + i in wanted:
                text[lo + i] = doc
    return [(text[r], text[best[r][1]], dedup.KINDS[best[r][0]]) for r in sorted(best)]


def _job_figures(job: Path, plan: dict, records: dict) -> dict:
    """Per stage and worker: tasks, documents, bytes, seconds and MB/s of the tasks run in this job's
    last run (a task a rerun skipped keeps the figures of the run that did it)."""
    stages = {}
    for stage in plan["stages"]:
        rows = {}
        for task in plan["tasks"][stage]:
            path = _record(job, stage, task)
            record = records.get(tuple(task)) if stage == "encode" else json.loads(path.read_text())
            row = rows.setdefault(
                record["worker"],
                {"worker": record["worker"], "tasks": 0, "documents": 0, "bytes": 0, "seconds": 0.0},
            )
            row["tasks"] += 1
            row["documents"] += record.get("documents", 0)
            row["bytes"] += record.get("bytes", 0)
            row["seconds"] = round(row["seconds"] + record["seconds"], 3)
        for row in rows.values():
            row["mb_per_s"] = round(row["bytes"] / max(row["seconds"], 1e-9) / 1e6, 3)
        stages[stage] = [rows[w] for w in sorted(rows)]
    return {
        "engine": plan["engine"],
        "workers": plan["jobs"],
        "dedup_buckets": plan["buckets"],
        "stages": stages,
    }


def prepare(
    config_path: str | Path,
    tokenizer: str | Path | None = None,
    out: str | Path | None = None,
    decontaminate: list[str] = (),
    ngram: int = DEFAULT_NGRAM,
    decontaminate_action: str = "remove",
    progress: bool = True,
    workers: int = 0,
    jobs: int = 1,
    test_items: dict[str, list[str]] | None = None,
    min_item_tokens: int = MIN_ITEM_TOKENS,
) -> dict:
    """Prepare every domain of a data config (`tokenizer` and `out` override the config's) on this
    machine; returns the manifest. `decontaminate`: test-set files or globs, `test_items`: test texts
    by source (lm-eval tasks: teleflm.eval.harness.task_items), whose n-grams (`ngram` tokens) mark
    training documents to "remove" or "report" (`decontaminate_action`). `jobs`: workers
    run as separate processes (1: all here); `workers`: encoding threads per job (0: the cores,
    shared among the jobs)."""
    job = plan_job(
        config_path,
        tokenizer,
        out,
        decontaminate,
        test_items,
        ngram,
        min_item_tokens,
        decontaminate_action,
        jobs,
        "local",
    )
    run_local(job, workers=workers, progress=progress)
    return merge(job)


class WorkerFailed(RuntimeError):
    pass


def worker_command(job: Path, stage: str, worker: str, workers: int) -> list[str]:
    """The command that runs one worker of one stage (`worker` may be a shell variable)."""
    return [
        sys.executable,
        "-m",
        "teleflm.cli.main",
        "data",
        "worker",
        "--job",
        str(Path(job).resolve()),
        "--stage",
        stage,
        "--worker",
        worker,
        "--workers",
        str(workers),
    ]


def run_local(job: str | Path, workers: int = 0, progress: bool = True) -> None:
    """Every stage of the job on this machine: with one job worker, here; with N, N processes at
    once (each with `workers` encoding threads, default the cores shared among them), stage after
    stage. A failed worker stops the job after the others finish their tasks; the error says how to
    rerun it alone."""
    job = Path(job)
    plan = read_plan(job)
    jobs = plan["jobs"]
    for stage in plan["stages"]:
        if jobs == 1:
            run_worker(job, stage, 0, workers, progress)
            continue
        per_worker = workers or max(1, _cores() // jobs)
        logs = job / "logs"
        logs.mkdir(exist_ok=True)
        processes = []
        for w in range(jobs):
            with (logs / f"{stage}-{w:05d}.log").open("w") as log:
                command = worker_command(job, stage, str(w), per_worker)
                processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        _watch(job, stage, processes, progress)
        failed = [(w, p.returncode) for w, p in enumerate(processes) if p.returncode != 0]
        if failed:
            lines = [
                f"worker {w} of {jobs} failed in stage {stage} (exit {rc}); its log: {logs / f'{stage}-{w:05d}.log'}; "
                f"rerun it alone: {shlex.join(worker_command(job, stage, str(w), per_worker))}"
                for w, rc in failed
            ]
            raise WorkerFailed("\n".join(lines) + "\nthen run the same prepare again: finished work is kept")


def _watch(job: Path, stage: str, processes: list, progress: bool) -> None:
    """Wait for the processes, with one progress bar for all of them (from their progress files)."""
    bar = None
    if progress:
        from tqdm import tqdm

        plan = read_plan(job)
        total = sum(plan["sizes"][stage]) if stage != "dedup" else len(plan["tasks"][stage])
        bar = tqdm(total=total, unit="B" if stage != "dedup" else "bucket", unit_scale=True, desc=stage)
    while any(p.poll() is None for p in processes):
        if bar is not None:
            figures = stage_progress(job, stage)
            bar.n = figures["bytes"]
            bar.set_postfix(documents=f"{figures['documents']:,}", running=figures["running"], refresh=False)
            bar.refresh()
        time.sleep(0.5)  # polling the workers' files, not a wait for any result
    if bar is not None:
        bar.n = stage_progress(job, stage)["bytes"]
        bar.close()


def stage_progress(job: Path, stage: str) -> dict:
    """The whole job's progress in one stage, summed over its workers' progress files: documents,
    bytes (of input), bytes_total, seconds and MB/s since the first worker started, ETA in seconds."""
    states = [json.loads(p.read_text()) for p in sorted((job / "progress").glob(f"{stage}-*.json"))]
    plan = read_plan(job)
    total = sum(plan["sizes"][stage]) if stage != "dedup" else len(plan["tasks"][stage])
    done = sum(s["bytes"] for s in states)
    started = min((s["started"] for s in states), default=time.time())
    ended = max((s["updated"] for s in states), default=started)
    rate = done / max(ended - started, 1e-9)
    return {
        "stage": stage,
        "workers": len(states),
        "running": sum(s["finished"] is None for s in states),
        "tasks_done": sum(s["tasks_done"] for s in states),
        "tasks": len(plan["tasks"][stage]),
        "documents": sum(s["documents"] for s in states),
        "bytes": done,
        "bytes_total": total,
        "seconds": ended - started,
        "mb_per_s": rate / 1e6,
        "eta_s": (total - done) / rate if rate > 0 else None,
    }


def encode_documents(encoder, docs: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(token ids end to end in `dtype`, token count per document)."""
    ids = [e.ids for e in encoder.encode_batch_fast(docs, add_special_tokens=False)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return tokens, lengths


class ChunkEncoder:
    """Encodes a stream of chunks of documents, in order, on `workers` threads (default: one per core),
    each running the tokenizer on one core. `tokenizers` releases the GIL while it encodes, so the
    threads run beside each other and beside the reading of the next chunks, with nothing copied
    between processes and nothing to start (a pool of processes took 0.3 s to start here). The
    library's own threads are switched off while it runs: each of its calls waits for its slowest
    document."""

    def __init__(self, encoder, workers: int = 0):
        self.encoder = encoder
        self.dtype = token_dtype(encoder.get_vocab_size())
        self.workers = workers or _cores()

    def __enter__(self) -> "ChunkEncoder":
        self.parallelism = os.environ.get(PARALLELISM)
        # Read at each call: one core per call; the threads are the parallelism.
        os.environ[PARALLELISM] = "false"
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="encode")
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(cancel_futures=True)
        if self.parallelism is None:
            os.environ.pop(PARALLELISM, None)
        else:
            os.environ[PARALLELISM] = self.parallelism

    def encoded(self, items):
        """(key, (tokens, lengths)) for each (key, chunk of documents) of `items`, in order;
        a None chunk passes through as None (a marker that stays in order)."""
        pending = deque()
        for key, chunk in items:
            work = (
                None if chunk is None else self.pool.submit(encode_documents, self.encoder, chunk, self.dtype)
            )
            pending.append((key, work))
            if len(pending) >= 2 * self.workers:  # bounded memory: wait for the oldest
                yield _resolved(*pending.popleft())
        while pending:
            yield _resolved(*pending.popleft())


def _resolved(key, encoding):
    return key, None if encoding is None else encoding.result()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False))
    os.replace(tmp, path)
