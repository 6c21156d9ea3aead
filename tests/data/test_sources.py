"""Reading raw files: documents split as configured, invalid UTF-8 replaced and counted exactly,
long lines and documents streamed in bounded pieces."""

import gzip
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import teleflm.data.sources as sources
from teleflm.data.sources import ReadStats, read_documents


def replaced_count(data: bytes) -> int:
    """How many U+FFFD Python's errors="replace" inserts (those already in the bytes excepted)."""
    return data.decode("utf-8", "replace").count("\ufffd") - data.decode("utf-8", "ignore").count("\ufffd")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300), st.integers(1, 64))
def test_any_bytes_decode_as_replace_does_and_are_counted(tmp_path, monkeypatch, data, piece):
    monkeypatch.setattr(sources, "PIECE_BYTES", piece)  # lines cut anywhere, even inside a character
    path = tmp_path / "any.txt"
    path.write_bytes(data)
    stats = ReadStats()
    docs = list(read_documents(path, doc_split="file", stats=stats))
    expected = data.decode("utf-8", "replace")
    assert docs == ([expected] if expected.strip() else [])
    assert stats.invalid_utf8.get(str(path), 0) == replaced_count(data)


@pytest.mark.parametrize(
    "split, expected",
    [
        ("line", ["a", "b", " c ", "d"]),
        ("blank_line", ["a\nb", " c \nd"]),
        ("file", ["a\nb\n\n \n c \nd\n"]),
    ],
)
def test_doc_split(tmp_path, split, expected):
    path = tmp_path / "t.txt.gz"
    path.write_bytes(gzip.compress(b"a\nb\n\n \n c \nd\n"))
    assert list(read_documents(path, doc_split=split)) == expected


def test_long_lines_and_documents_come_in_bounded_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", 1000)
    text = "x" * 10_500 + "\n\nshort\n"
    path = tmp_path / "long.txt"
    path.write_text(text)
    pieces = list(read_documents(path, max_doc_chars=3000))
    assert [len(p) for p in pieces] == [3000, 3000, 3000, 1500, 5]
    assert "".join(pieces[:4]) == "x" * 10_500
    assert list(read_documents(path)) == ["x" * 10_500, "short"]  # no limit: whole documents


def test_empty_and_whitespace_files_give_no_documents(tmp_path):
    stats = ReadStats()
    for name, data in [("empty.txt", b""), ("blank.txt", b"\n \n\t\n"), ("empty.jsonl", b"\n")]:
        (tmp_path / name).write_bytes(data)
        assert list(read_documents(tmp_path / name, stats=stats)) == []
    assert stats.empty_files == [str(tmp_path / n) for n in ("empty.txt", "blank.txt", "empty.jsonl")]


def test_bad_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a JSON object with a 'text' field"):
        list(read_documents(path))
    path.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: 'text' is a int"):
        list(read_documents(Path(path)))
