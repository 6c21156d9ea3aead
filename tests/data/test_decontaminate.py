"""Decontamination: test passages planted in training documents are found, near misses are kept."""

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from teleflm.data.decontaminate import NgramIndex, load_test_ngrams, ngram_hashes, window_documents
from teleflm.data.prepare import prepare
from teleflm.data.shards import open_shards
from teleflm.data.tokenizer import load_tokenizer, raw_tokenizer
from teleflm.eval.harness import task_items
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


def write_task(folder, name, items, prompt="Question: {{question}}\\nAnswer:"):
    """A local lm-eval task in the format of teleflm/eval/tasks/ (multiple choice, JSONL data)."""
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {name}.jsonl\n"
        f'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{prompt}"\n'
        'target_delimiter: " "\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )


def test_a_planted_lm_eval_task_is_found_and_removed(tmp_path, tokenizer_dir):
    """The tasks' documents, rendered as lm-eval scores them (prompt, delimiter, gold answer), are
    found inside training documents; a short item is matched whole, a tiny one is skipped and counted."""
    questions = [
        "Which river did the seven silver moons of the wonderful machine sing about tonight",
        "How many mountains stood between the farmer and the sea in the old story of rivers",
        "What did the carpenter build for the king after the great flood had passed away",
    ]
    choices = ["the first", "the gold one", "the third"]
    write_task(
        tmp_path / "tasks",
        "planted_qa",
        [{"question": q, "choices": choices, "answer": 1} for q in questions],
    )
    short_items = [
        {"question": "Who wrote it?", "choices": ["Paul", "Peter"], "answer": 0},  # 8 to 12 tokens
        {"question": "Why", "choices": ["yes", "no"], "answer": 0},  # too short to match alone
    ]
    write_task(tmp_path / "tasks", "planted_short", short_items, prompt="{{question}}")
    encoder = raw_tokenizer(tokenizer_dir)
    short, tiny = "Who wrote it? Paul", "Why yes"
    assert 8 <= len(encoder.encode(short).ids) < 13 and len(encoder.encode(tiny).ids) < 8
    planted = [
        f"Some notes {i}. Question: {q}\nAnswer: the gold one. More notes." for i, q in enumerate(questions)
    ]
    planted.append(f"A forum post quoting {short} and nothing else.")
    clean = [f"Doc {i} about farming, rivers and the sea." for i in range(20)]
    clean.append(f"{tiny}, said the farmer.")  # the tiny item is too common a text to count
    toml = data_toml(tmp_path, tokenizer_dir, {"d": (clean + planted, 1.0, 1.0)}, heldout=0.0)

    items = task_items(["planted_qa", "planted_short"], [tmp_path / "tasks"])
    assert items["planted_short"] == [short, tiny]
    manifest = prepare(toml, test_items=items, progress=False)
    info = manifest["decontamination"]
    assert info["test_tasks"] == {"planted_qa": 3, "planted_short": 2} and info["test_documents"] == 5
    assert info["test_documents_matched_whole"] == 1 and info["test_documents_too_short"] == 1
    assert manifest["domains"]["d"]["removed_documents"] == 4
    tok = load_tokenizer(tokenizer_dir)
    kept = [tok.decode(ids.tolist()) for ids, _ in open_shards(tmp_path / "shards").documents("d")]
    assert sorted(kept) == sorted(clean)


def test_the_shipped_kjv_task_marks_the_chapters_it_was_made_from(tokenizer_dir):
    """teleflm_kjv_next_verse's items (a chapter's heading, two verses, the next one) are cut from
    held-out chapters of the sample: every one of those chapters is found. (Others are too: 13 tokens
    of this 1000-token vocabulary are three or four words, and the KJV repeats its formulas.)"""
    from teleflm.data import sample

    encoder = raw_tokenizer(tokenizer_dir)
    items = task_items(["teleflm_kjv_next_verse"])
    index = load_test_ngrams([], encoder, items=items)
    chapters = sample.kjv_chapters()
    heading = {c.split("\n\n", 1)[0]: i for i, c in enumerate(chapters)}
    sources = {heading[item.split("\n\n", 1)[0]] for item in items["teleflm_kjv_next_verse"]}
    encodings = encoder.encode_batch_fast(chapters, add_special_tokens=False)
    tokens = np.concatenate([e.ids for e in encodings])
    offsets = np.concatenate([[0], np.cumsum([len(e.ids) for e in encodings])])
    dirty = set(np.flatnonzero(index.contaminated(tokens, offsets)).tolist())
    assert len(items["teleflm_kjv_next_verse"]) == 200 and len(sources) > 40
    assert sources <= dirty  # every chapter a test item was cut from
