"""Raw documents from the formats users have: plain text, JSONL, Parquet; gzip, zstd or xz compressed.

Streams: nothing holds more than one file's current chunk. Invalid UTF-8 is replaced (U+FFFD) and
counted per file, so the manifest can name the files that had it.
"""

import gzip
import io
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ReadStats:
    invalid_utf8: dict[str, int] = field(default_factory=dict)  # file -> replaced characters
    empty_files: list[str] = field(default_factory=list)


def open_binary(path: Path):
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb")))
    return path.open("rb")


def base_suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".xz", ".zst")]
    return suffixes[-1] if suffixes else ""


def _text_lines(path: Path, stats: ReadStats) -> Iterator[str]:
    with open_binary(path) as raw:
        for line in raw:
            text = line.decode("utf-8", errors="replace")
            bad = text.count("\ufffd") - line.count("\ufffd".encode())  # minus U+FFFD already in the file
            if bad > 0:
                stats.invalid_utf8[str(path)] = stats.invalid_utf8.get(str(path), 0) + bad
            yield text


def read_documents(
    path: Path, text_field: str = "text", doc_split: str = "blank_line", stats: ReadStats | None = None
) -> Iterator[str]:
    """The documents of one file. Plain text is split by `doc_split`: "line", "blank_line" or "file"."""
    stats = stats if stats is not None else ReadStats()
    kind = base_suffix(path)
    count = 0
    if kind == ".parquet":
        import pyarrow.parquet as pq

        with open_binary(path) as f:
            table = pq.ParquetFile(f)
            if text_field not in table.schema_arrow.names:
                raise ValueError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names})")
            for batch in table.iter_batches(columns=[text_field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    if text:
                        count += 1
                        yield text
    elif kind in (".jsonl", ".json"):
        for number, line in enumerate(_text_lines(path, stats), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path}:{number}: not a JSON object with a {text_field!r} string ({e})"
                ) from None
            if text:
                count += 1
                yield text
    else:
        if doc_split not in ("line", "blank_line", "file"):
            raise ValueError(f"doc_split must be line, blank_line or file, got {doc_split!r}")
        lines: list[str] = []
        for line in _text_lines(path, stats):
            if doc_split == "line" or (doc_split == "blank_line" and not line.strip()):
                doc = "".join(lines) + (line if doc_split == "line" else "")
                lines = []
                if doc.strip():
                    count += 1
                    yield doc.rstrip("\n")
            else:
                lines.append(line)
        doc = "".join(lines)
        if doc.strip():
            count += 1
            yield doc.rstrip("\n") if doc_split != "file" else doc
    if count == 0:
        stats.empty_files.append(str(path))
