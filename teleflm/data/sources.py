"""Raw documents from the formats users have: plain text, JSONL, Parquet; gzip, zstd or xz compressed.

Streams: a file is read in pieces of at most PIECE_BYTES, so memory holds one document at a time
(one piece of it when `max_doc_chars` cuts long documents), whatever the file size. Invalid UTF-8 is
replaced by U+FFFD, as Python's "replace" does, and counted per file, so the manifest can name the
files that had it. A file of one document per line (JSONL, or plain text split by "line"),
uncompressed, can be read by byte range: the documents whose line starts in [start, end), so that
the ranges of a file give each of its documents exactly once, to the workers of a cluster.
"""

import codecs
import contextlib
import gzip
import io
import json
import lzma
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PIECE_BYTES = 1 << 20  # longest single read: a longer line arrives in several pieces
COMPRESSED = (".gz", ".xz", ".zst")
DOC_SPLITS = ("line", "blank_line", "file")


@dataclass
class ReadStats:
    invalid_utf8: dict[str, int] = field(default_factory=dict)  # file -> invalid sequences replaced
    documents: dict[str, int] = field(default_factory=dict)  # file -> documents read (ranges add up)

    @property
    def empty_files(self) -> list[str]:
        """Files that gave no document."""
        return [path for path, count in self.documents.items() if count == 0]


# A codec error handler that does what errors="replace" does and counts each replacement.
_replaced = threading.local()


def _replace_and_count(error: UnicodeDecodeError) -> tuple[str, int]:
    _replaced.count = getattr(_replaced, "count", 0) + 1
    return "\ufffd", error.end


codecs.register_error("teleflm-count-replace", _replace_and_count)


def open_binary(path: Path):
    """The decompressed bytes of `path` (by suffix: .gz, .xz, .zst or none)."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".xz"):
        return lzma.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb")), PIECE_BYTES)
    return path.open("rb")


def base_suffix(path: Path) -> str:
    """The format suffix under any compression suffix: data.jsonl.zst -> .jsonl."""
    suffixes = [s for s in path.suffixes if s not in COMPRESSED]
    return suffixes[-1].lower() if suffixes else ""


@contextlib.contextmanager
def _read_errors(path: Path):
    """Damaged compressed input: an error naming the file instead of a codec's bare message."""
    import zstandard

    try:
        yield
    except (EOFError, OSError, lzma.LZMAError, zstandard.ZstdError) as e:
        raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e}); is the file complete?") from None


def splits_by_range(path: Path, doc_split: str) -> bool:
    """Whether `path` can be read by byte range: uncompressed, one document per line."""
    kind = base_suffix(path)
    one_per_line = kind in (".jsonl", ".json") or (kind != ".parquet" and doc_split == "line")
    return one_per_line and not path.name.endswith(COMPRESSED)


def _range_blocks(raw, start: int, end: int | None) -> Iterator[bytes]:
    """Blocks of the bytes of the lines starting in [start, end) (end None: the end of the file): a
    line in progress at `start` belongs to the range before, one that starts before `end` is read
    to its end."""
    pos, data = 0, b""
    if start > 0:
        raw.seek(start - 1)
        pos = start - 1
        while True:  # skip to just after the first "\n" at or after start - 1
            block = raw.read(PIECE_BYTES)
            if not block:
                return
            cut = block.find(b"\n")
            if cut >= 0:
                data, pos = block[cut + 1 :], pos + cut + 1
                break
            pos += len(block)
    if end is not None and pos >= end:
        return
    last = b"\n"
    while True:
        if not data and not (data := raw.read(PIECE_BYTES)):
            return
        if end is None or pos + len(data) <= end:
            yield data
            pos, last, data = pos + len(data), data[-1:], b""
            continue
        head, tail = data[: end - pos], data[end - pos :]
        if head:
            yield head
            last = head[-1:]
        if last == b"\n":  # the line at `end` is the next range's
            return
        while True:  # finish the line that started before `end`
            cut = tail.find(b"\n")
            if cut >= 0:
                yield tail[: cut + 1]
                return
            if tail:
                yield tail
            if not (tail := raw.read(PIECE_BYTES)):
                return


def _lines(
    path: Path, stats: ReadStats, start: int = 0, end: int | None = None
) -> Iterator[tuple[str, bool]]:
    """(text, ends_line) pieces of the file's decoded text (of the lines starting in [start, end)),
    each line with its "\n"; a line longer than PIECE_BYTES comes in several pieces, only the last
    with ends_line True. Read and decoded a block of PIECE_BYTES at a time and split in C: per-line
    reads cost more than the tokenizer."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="teleflm-count-replace")

    def decode(data: bytes, final: bool = False) -> str:
        before = getattr(_replaced, "count", 0)
        text = decoder.decode(data, final)
        if replaced := getattr(_replaced, "count", 0) - before:
            stats.invalid_utf8[str(path)] = stats.invalid_utf8.get(str(path), 0) + replaced
        return text

    tail = ""  # the start of a line not ended yet
    with _read_errors(path), open_binary(path) as raw:
        blocks = (
            _range_blocks(raw, start, end)
            if start or end is not None
            else iter(lambda: raw.read(PIECE_BYTES), b"")
        )
        for block in blocks:
            *lines, tail = _LINE_ENDS.split(tail + decode(block))
            for line in lines:
                yield line, True
            if len(tail) >= PIECE_BYTES:
                yield tail, False
                tail = ""
        tail += decode(b"", final=True)  # a multi-byte sequence cut by the end of the file
        if tail:
            yield tail, True


_LINE_ENDS = re.compile("(?<=\n)")  # splits after each "\n", keeping it with its line


def _plain_documents(
    path: Path, doc_split: str, max_doc_chars: int, stats: ReadStats, start: int, end: int | None
) -> Iterator[str]:
    """Documents of a plain-text file: one per line, per blank-line-separated block, or the whole
    file; cut into pieces of `max_doc_chars` when set (so a huge document never sits in memory)."""
    doc: list[str] = []  # pieces of the current document
    doc_chars = 0
    line_start = 0  # where the current line begins in `doc`
    for piece, ends_line in _lines(path, stats, start, end):
        doc.append(piece)
        doc_chars += len(piece)
        if ends_line and doc_split == "line":
            yield from _finish(doc)
            doc, doc_chars = [], 0
        elif ends_line and doc_split == "blank_line" and not "".join(doc[line_start:]).strip():
            yield from _finish(doc[:line_start])
            doc, doc_chars = [], 0
        while max_doc_chars and doc_chars >= max_doc_chars:
            text = "".join(doc)
            yield text[:max_doc_chars]
            doc, doc_chars = [text[max_doc_chars:]], doc_chars - max_doc_chars
            line_start = 0
        if ends_line:
            line_start = len(doc)
    yield from _finish(doc, keep_newline=doc_split == "file")


def _finish(pieces: list[str], keep_newline: bool = False) -> Iterator[str]:
    text = "".join(pieces)
    if text.strip():
        yield text if keep_newline else text.rstrip("\r\n")


def _cut(documents: Iterator[str], max_doc_chars: int) -> Iterator[str]:
    for doc in documents:
        if max_doc_chars:
            yield from (doc[i : i + max_doc_chars] for i in range(0, len(doc), max_doc_chars))
        else:
            yield doc


def _jsonl_documents(
    path: Path, text_field: str, stats: ReadStats, start: int, end: int | None
) -> Iterator[str]:
    record: list[str] = []
    number = 0  # line within the range read (the whole file unless a range was asked)
    where = f"{path}" if not start else f"{path} (from byte {start})"
    for piece, ends_line in _lines(path, stats, start, end):
        record.append(piece)
        if not ends_line:
            continue
        line, record = "".join(record), []
        number += 1
        if not line.strip():
            continue
        try:
            text = json.loads(line)[text_field]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{where}:{number}: not a JSON object with a {text_field!r} field ({e})"
            ) from None
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{where}:{number}: {text_field!r} is a {type(text).__name__}, not a string")
        if text:
            yield text


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with contextlib.ExitStack() as stack:
        if path.name.endswith(COMPRESSED):  # Parquet needs random access: decompress to a temporary file
            local = stack.enter_context(tempfile.NamedTemporaryFile(suffix=".parquet"))
            with _read_errors(path), open_binary(path) as raw:
                shutil.copyfileobj(raw, local, PIECE_BYTES)
            local.flush()
            path_to_read = local.name
        else:
            path_to_read = path
        table = pq.ParquetFile(path_to_read)
        schema = table.schema_arrow
        if text_field not in schema.names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {schema.names})")
        if not pa.types.is_string(schema.field(text_field).type) and not pa.types.is_large_string(
            schema.field(text_field).type
        ):
            raise ValueError(
                f"{path}: column {text_field!r} is {schema.field(text_field).type}, not a string"
            )
        for batch in table.iter_batches(columns=[text_field], batch_size=1024):
            yield from (text for text in batch.column(0).to_pylist() if text)


def read_documents(
    path: Path,
    text_field: str = "text",
    doc_split: str = "blank_line",
    max_doc_chars: int = 0,
    stats: ReadStats | None = None,
    start: int = 0,
    end: int | None = None,
) -> Iterator[str]:
    """The documents of one file. JSONL (.jsonl, .json) and Parquet give one per record's
    `text_field`; plain text is split by `doc_split` ("line", "blank_line" or "file"). With `start`
    or `end`: the documents of the lines starting in that byte range (files `splits_by_range` allows)."""
    if doc_split not in DOC_SPLITS:
        raise ValueError(f"doc_split must be one of {DOC_SPLITS}, got {doc_split!r}")
    if (start or end is not None) and not splits_by_range(path, doc_split):
        raise ValueError(f"{path}: only uncompressed files of one document per line are read by byte range")
    stats = stats if stats is not None else ReadStats()
    kind = base_suffix(path)
    if kind == ".parquet":
        documents = _cut(_parquet_documents(path, text_field), max_doc_chars)
    elif kind in (".jsonl", ".json"):
        documents = _cut(_jsonl_documents(path, text_field, stats, start, end), max_doc_chars)
    else:
        documents = _plain_documents(path, doc_split, max_doc_chars, stats, start, end)
    count = 0
    for count, doc in enumerate(documents, 1):  # noqa: B007 (count is read after the loop)
        yield doc
    stats.documents[str(path)] = stats.documents.get(str(path), 0) + count
