"""The byte-level tokenizer: exact bytes back for any text, the released special ids, loads in transformers."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from teleflm.data.sources import read_documents
from teleflm.data.tokenizer import (
    SPECIAL_TOKENS,
    load_tokenizer,
    raw_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)
from tests.conftest import sample_text


def test_special_tokens_have_the_released_ids(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)  # plain transformers loads it
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok("In the beginning")["input_ids"][0] != 1  # no BOS added


@pytest.mark.parametrize("name", ["kjv", "poems", "code"])
def test_corpora_round_trip_byte_exact(tokenizer_dir, name):
    data = sample_text(name).encode()
    middle = len(data) // 2  # a slice from the middle too: not only what the tokenizer was trained on
    tok, raw = load_tokenizer(tokenizer_dir), raw_tokenizer(tokenizer_dir)
    for piece in (data[:30_000], data[middle : middle + 30_000]):
        text = piece.decode(errors="ignore")  # a slice may cut a character at either end
        assert raw.decode(raw.encode(text).ids, skip_special_tokens=False).encode() == text.encode()
        assert tok.decode(tok(text[:5_000])["input_ids"]) == text[:5_000]


ADVERSARIAL = [
    "emoji 👩🏽‍🚀🇨🇳 and ZWJ\u200d joins",
    "control \x00\x01\x1b[31m\x7f chars\r\n\ttabs",
    "combining e\u0301 and lone \u0301 marks, RTL \u202e",
    "  leading and trailing spaces  ",
    "def f(x):\n    return x ** 2  # code\n",
    "混合 English 和中文，标点。",
    "\ufffd replacement char and <_user> markers in text",
]


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_any_text_round_trips(tokenizer_dir, text):
    enc = raw_tokenizer(tokenizer_dir)
    assert enc.decode(enc.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_adversarial_strings_round_trip(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    for text in ADVERSARIAL:
        assert tok.decode(tok(text)["input_ids"]) == text


def test_autotokenizer_round_trips_adversarial_strings(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in ADVERSARIAL:
        assert tok.decode(tok(text)["input_ids"]) == text


def test_files_and_globs_or_an_iterator_of_texts(tmp_path, texts):
    (tmp_path / "a.txt").write_text(texts["en"][:30_000])
    (tmp_path / "b.txt").write_text(texts["poems"][:10_000])
    from_files = train_tokenizer([tmp_path / "a.txt", str(tmp_path / "b*.txt")], 400, tmp_path / "f")
    from_texts = train_tokenizer(
        itertools.chain(read_documents(tmp_path / "a.txt"), read_documents(tmp_path / "b.txt")),
        400,
        tmp_path / "t",
    )
    assert tokenizer_hash(from_files) == tokenizer_hash(from_texts)  # the same documents, the same BPE
    with pytest.raises(FileNotFoundError, match="matches no file"):
        train_tokenizer([str(tmp_path / "missing*.txt")], 400, tmp_path / "m")
    with pytest.raises(TypeError, match="not one string"):
        train_tokenizer(str(tmp_path / "a.txt"), 400, tmp_path / "s")
    with pytest.raises(ValueError, match="below the 256 bytes"):
        train_tokenizer(iter(["x"]), 100, tmp_path / "small")
