"""Decontamination: test passages planted in training documents are found, near misses are kept."""

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from teleflm.data.decontaminate import NgramIndex, load_test_ngrams, ngram_hashes, window_documents
from teleflm.data.prepare import prepare
from teleflm.data.shards import open_shards
from teleflm.data.tokenizer import load_tokenizer, raw_tokenizer
from tests.data.conftest import data_toml

PASSAGE = "Behold the wonderful machine sang of rivers and mountains under seven silver moons tonight"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=40), st.integers(1, 5))
def test_hashes_are_equal_exactly_for_equal_windows(tokens, n):
    tokens = np.array(tokens, dtype=np.int64)
    hashes = ngram_hashes(tokens, n)
    windows = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    assert len(hashes) == len(windows)
    for i in range(len(windows)):
        for j in range(len(windows)):
            assert (hashes[i] == hashes[j]) == (windows[i] == windows[j])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 8), max_size=12), st.integers(1, 4))
def test_windows_never_cross_documents(lengths, n):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    starts, doc = window_documents(offsets, n)
    naive = [(s, d) for d in range(len(lengths)) for s in range(offsets[d], offsets[d + 1] - n + 1)]
    assert list(zip(starts.tolist(), doc.tolist(), strict=True)) == naive


def test_index_marks_only_documents_holding_a_test_ngram():
    test = np.array([9, 8, 7, 6, 5])
    index = NgramIndex(3, {3: np.unique(ngram_hashes(test, 3))})
    docs = [[1, 9, 8, 7, 2], [9, 8, 1, 7, 6], [7, 6], [5, 6, 7, 5, 9, 8]]
    tokens = np.concatenate(docs)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    assert index.contaminated(tokens, offsets).tolist() == [True, False, False, False]


def test_planted_passages_are_removed_and_near_misses_kept(tmp_path, tokenizer_dir):
    test_file = tmp_path / "test.jsonl"
    test_file.write_text(
        json.dumps({"text": "Question: " + PASSAGE + " Answer: yes"})
        + "\n"
        + json.dumps({"text": "short"})
        + "\n"
    )
    encoder = raw_tokenizer(tokenizer_dir)
    near = " ".join(PASSAGE.split()[:2])  # a shared run shorter than 13 tokens
    assert 3 <= len(encoder.encode(" " + near).ids) < 13
    planted = [f"Intro {i}. {PASSAGE} and more." for i in range(3)]
    near_misses = [f"Unrelated start {near} then something else {i}." for i in range(3)]
    train = [f"Doc {i} about farming." for i in range(20)] + planted + near_misses
    toml = data_toml(tmp_path, tokenizer_dir, {"d": (train, 1.0, 1.0)}, heldout=0.0)

    manifest = prepare(toml, decontaminate=[str(test_file)], ngram=13, progress=False)
    assert manifest["domains"]["d"]["contaminated_documents"] == 3
    assert manifest["domains"]["d"]["removed_documents"] == 3
    info = manifest["decontamination"]
    assert info["test_documents"] == 2 and info["test_documents_too_short"] == 1
    assert info["ngram"] == 13 and info["action"] == "remove" and info["test_ngrams"] > 0
    tok = load_tokenizer(tokenizer_dir)
    kept = [tok.decode(ids.tolist()) for ids, _ in open_shards(tmp_path / "shards").documents("d")]
    assert sorted(kept) == sorted(d for d in train if d not in planted)

    # "report" keeps them and counts them; the changed action re-does the domain.
    report = prepare(toml, decontaminate=[str(test_file)], decontaminate_action="report", progress=False)
    assert report["domains"]["d"]["contaminated_documents"] == 3
    assert report["domains"]["d"]["removed_documents"] == 0
    assert report["domains"]["d"]["splits"]["train"]["documents"] == len(train)


def test_shorter_ngram_catches_the_near_misses(tmp_path, tokenizer_dir):
    test_file = tmp_path / "test.txt"
    test_file.write_text(PASSAGE)
    index = load_test_ngrams([str(test_file)], raw_tokenizer(tokenizer_dir), n=3)
    encoder = raw_tokenizer(tokenizer_dir)
    # Three words from inside the passage: preceded by a space there and here, so (byte-level BPE
    # splitting at spaces) the same tokens, at least 3 of them.
    shared = " " + " ".join(PASSAGE.split()[2:5])
    assert len(encoder.encode(shared).ids) >= 3
    near = encoder.encode("Unrelated start" + shared + " then").ids
    far = encoder.encode("Unrelated start of something else then").ids
    tokens = np.array(near + far)
    offsets = np.array([0, len(near), len(near) + len(far)])
    assert index.contaminated(tokens, offsets).tolist() == [True, False]
