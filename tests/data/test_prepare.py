"""Preparing shards: every input format, a manifest that checks what is read, decontamination, and
clear refusals of bad input."""

import gzip
import json
import lzma

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from teleflm.data.prepare import ngram_hashes, prepare
from teleflm.data.shards import ShardError, open_shards
from teleflm.data.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer
from tests.data.conftest import data_toml

DOCS = [f"Document number {i}: " + "and the word was with God. " * (i % 5 + 1) for i in range(40)]


def test_every_format_gives_the_same_documents(tmp_path, tokenizer_dir):
    jsonl = "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    (tmp_path / "c.jsonl.xz").write_bytes(lzma.compress(jsonl))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "d.parquet")
    (tmp_path / "e.txt").write_text("\n\n".join(DOCS))
    lines = [f'tokenizer = "{tokenizer_dir}"', 'out = "shards"', "heldout_fraction = 0.0"]
    for name, pattern in [
        ("gz", "a.jsonl.gz"),
        ("zst", "b.jsonl.zst"),
        ("xz", "c.jsonl.xz"),
        ("pq", "*.parquet"),
        ("txt", "e.txt"),
    ]:
        lines += ["[[domains]]", f'name = "{name}"', f'inputs = ["{pattern}"]']
    (tmp_path / "data.toml").write_text("\n".join(lines))
    prepare(tmp_path / "data.toml", progress=False)
    shards = open_shards(tmp_path / "shards", expected_tokenizer_hash=tokenizer_hash(tokenizer_dir))
    tok = load_tokenizer(tokenizer_dir)
    for domain in ["gz", "zst", "xz", "pq", "txt"]:
        docs = list(shards.documents(domain))
        assert [tok.decode(ids.tolist()) for ids, _ in docs] == DOCS, domain
        assert [n for _, n in docs] == [len(d.encode()) for d in DOCS]
    assert shards.tokens("gz").dtype == np.uint16  # a 1000-entry vocabulary fits


def test_heldout_split_is_by_document_and_fixed(tmp_path, tokenizer_dir):
    toml = data_toml(tmp_path, tokenizer_dir, {"d": (DOCS * 5, 1.0, 1.0)}, heldout=0.2)
    first = prepare(toml, progress=False)["domains"]["d"]["splits"]
    second = prepare(toml, out=tmp_path / "again", progress=False)["domains"]["d"]["splits"]
    assert 0 < first["val"]["documents"] < first["train"]["documents"]
    assert first["val"]["documents"] + first["train"]["documents"] == 200
    assert first == second


def test_rerun_skips_finished_domains(tmp_path, tokenizer_dir, capsys):
    toml = data_toml(tmp_path, tokenizer_dir, {"a": (DOCS, 1.0, 1.0), "b": (DOCS[:10], 1.0, 1.0)})
    prepare(toml, progress=False)
    mtime = (tmp_path / "shards" / "a" / "train.tokens").stat().st_mtime_ns
    capsys.readouterr()
    prepare(toml, progress=False)
    assert "a: up to date, skipped" in capsys.readouterr().out
    assert (tmp_path / "shards" / "a" / "train.tokens").stat().st_mtime_ns == mtime
    # A changed input is redone.
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "changed"}) + "\n")
    manifest = prepare(toml, progress=False)
    assert (
        manifest["domains"]["b"]["splits"]["train"]["documents"]
        + manifest["domains"]["b"]["splits"]["val"]["documents"]
        == 1
    )


def test_interrupted_domain_never_reads_as_complete(tmp_path, tokenizer_dir, monkeypatch):
    toml = data_toml(tmp_path, tokenizer_dir, {"a": (DOCS, 1.0, 1.0), "b": (DOCS, 1.0, 1.0)})
    import teleflm.data.prepare as module

    calls = {"n": 0}
    original = module.SplitWriter.add

    def crash_in_b(self, ids, sizes):
        calls["n"] += 1
        if "/.b." in str(self.paths["tokens"]):
            raise KeyboardInterrupt
        return original(self, ids, sizes)

    monkeypatch.setattr(module.SplitWriter, "add", crash_in_b)
    with pytest.raises(KeyboardInterrupt):
        prepare(toml, progress=False)
    shards = open_shards(tmp_path / "shards")
    assert shards.domains == ["a"]  # b was never entered in the manifest
    assert not (tmp_path / "shards" / "b").exists()


def test_decontamination_removes_planted_passages_and_keeps_near_misses(tmp_path, tokenizer_dir):
    passage = "Behold the wonderful machine sang of rivers and mountains under seven silver moons tonight"
    test_file = tmp_path / "test.jsonl"
    test_file.write_text(json.dumps({"text": "Question: " + passage + " Answer: yes"}) + "\n")
    tok = load_tokenizer(tokenizer_dir)
    near = " ".join(passage.split()[:3])  # a short shared run: fewer than 13 tokens in common
    near_doc = "Unrelated start " + near + " then something else entirely."
    shared = np.isin(
        ngram_hashes(np.array(tok(near_doc)["input_ids"]), 13),
        ngram_hashes(np.array(tok("Question: " + passage + " Answer: yes")["input_ids"]), 13),
    )
    assert not shared.any() and len(tok(near)["input_ids"]) >= 3
    train = [f"Doc {i} about farming." for i in range(20)] + [
        "Intro text. " + passage + " and more.",
        near_doc,
    ]
    toml = data_toml(tmp_path, tokenizer_dir, {"d": (train, 1.0, 1.0)}, heldout=0.0)
    manifest = prepare(toml, decontaminate=[str(test_file)], ngram=13, progress=False)
    assert manifest["domains"]["d"]["contaminated_documents"] == 1
    assert manifest["decontamination"]["test_documents"] == 1
    kept = [tok.decode(ids.tolist()) for ids, _ in open_shards(tmp_path / "shards").documents("d")]
    assert len(kept) == 21
    assert not any(passage in k for k in kept) and any(near in k for k in kept)
    # "report" keeps the document and counts it.
    report = prepare(
        toml,
        out=tmp_path / "r",
        decontaminate=[str(test_file)],
        decontaminate_action="report",
        progress=False,
    )
    assert report["domains"]["d"]["contaminated_documents"] == 1
    assert report["domains"]["d"]["splits"]["train"]["documents"] == 22


def test_invalid_utf8_is_replaced_counted_and_named(tmp_path, tokenizer_dir, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text\n\nbroken \xff\xfe bytes here\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "data.toml").write_text(
        f'tokenizer = "{tokenizer_dir}"\nout = "shards"\nheldout_fraction = 0.0\n'
        '[[domains]]\nname = "d"\ninputs = ["bad.txt", "empty.txt"]\n'
    )
    manifest = prepare(tmp_path / "data.toml", progress=False)
    entry = manifest["domains"]["d"]
    assert entry["invalid_utf8"] == {str(bad): 2}
    assert entry["empty_files"] == [str(tmp_path / "empty.txt")]
    out = capsys.readouterr().out
    assert f"{bad}: 2 invalid UTF-8" in out and "empty.txt: no documents" in out
    docs = list(open_shards(tmp_path / "shards").documents("d"))
    assert len(docs) == 2


def test_missing_input_is_refused_before_work(tmp_path, tokenizer_dir):
    (tmp_path / "data.toml").write_text(
        f'tokenizer = "{tokenizer_dir}"\nout = "shards"\n[[domains]]\nname = "d"\ninputs = ["nowhere/*.txt"]\n'
    )
    with pytest.raises(FileNotFoundError, match=r"domain 'd': input 'nowhere/\*\.txt' matches no file"):
        prepare(tmp_path / "data.toml", progress=False)
    assert not (tmp_path / "shards").exists()


def test_truncated_or_altered_shard_is_detected(tmp_path, shards_dir):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shards_dir, copy)
    tokens = copy / "en" / "train.tokens"
    data = bytearray(tokens.read_bytes())
    data[100] ^= 0xFF
    tokens.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"en/train\.tokens: checksum mismatch"):
        open_shards(copy)
    tokens.write_bytes(bytes(data[:-10]))
    with pytest.raises(ShardError, match=r"en/train\.tokens has \d+ bytes, the manifest says \d+: truncated"):
        open_shards(copy, verify=False)


def test_shards_of_another_tokenizer_are_refused(tmp_path, shards_dir, texts):
    other = train_tokenizer([texts["en"][:20_000]], 600, tmp_path / "other")
    with pytest.raises(ShardError, match="made with another tokenizer"):
        open_shards(shards_dir, expected_tokenizer_hash=tokenizer_hash(other))
