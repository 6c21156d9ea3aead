"""`teleflm data prepare`: every input format to the same shards, a fixed held-out split, re-runs that
skip finished work, interruptions that never read as complete, bounded chunks, clear refusals."""

import gzip
import json
import lzma
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import teleflm.data.prepare as prepare_module
from teleflm.data.prepare import load_data_config, prepare
from teleflm.data.shards import ShardError, open_shards
from teleflm.data.tokenizer import load_tokenizer, tokenizer_hash
from tests.data.conftest import data_toml

DOCS = [f"Document number {i}: " + "and the word was with God. " * (i % 5 + 1) for i in range(40)]


def test_every_format_gives_the_same_documents(tmp_path, tokenizer_dir):
    jsonl = "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    (tmp_path / "c.jsonl.xz").write_bytes(lzma.compress(jsonl))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "d.parquet")
    (tmp_path / "e.txt").write_text("\n\n".join(DOCS))
    (tmp_path / "f.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("\n".join(DOCS).encode()))
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "g.parquet")
    (tmp_path / "g.parquet.xz").write_bytes(lzma.compress((tmp_path / "g.parquet").read_bytes()))
    domains = {
        "gz": 'inputs = ["a.jsonl.gz"]',
        "zst": 'inputs = ["b.jsonl.zst"]',
        "xz": 'inputs = ["c.jsonl.xz"]',
        "pq": 'inputs = ["d.parquet"]',
        "txt": 'inputs = ["e.txt"]',
        "lines": 'inputs = ["f.txt.zst"]\ndoc_split = "line"',
        "pqxz": 'inputs = ["*.parquet.xz"]\ntext_field = "body"',
    }
    lines = [f'tokenizer = "{tokenizer_dir}"', 'out = "shards"', "heldout_fraction = 0.0"]
    for name, settings in domains.items():
        lines += ["[[domains]]", f'name = "{name}"', settings]
    (tmp_path / "data.toml").write_text("\n".join(lines))
    prepare(tmp_path / "data.toml", progress=False)
    shards = open_shards(tmp_path / "shards", expected_tokenizer_hash=tokenizer_hash(tokenizer_dir))
    tok = load_tokenizer(tokenizer_dir)
    for domain in domains:
        docs = list(shards.documents(domain))
        assert [tok.decode(ids.tolist()) for ids, _ in docs] == DOCS, domain
        assert [n for _, n in docs] == [len(d.encode()) for d in DOCS]
    assert shards.tokens("gz").dtype == np.uint16  # a 1000-entry vocabulary fits
    info = shards.split_info("gz")
    assert info["tokens"] == len(shards.tokens("gz")) and info["documents"] == len(DOCS)


def test_literal_special_tokens_in_text_stay_text(tmp_path, tokenizer_dir):
    docs = ["html </s> and <s> and <_user> written in a page", "plain"]
    prepare(data_toml(tmp_path, tokenizer_dir, {"d": (docs, 1.0, 1.0)}, heldout=0.0), progress=False)
    shards = open_shards(tmp_path / "shards")
    tokens = np.asarray(shards.tokens("d"))
    assert not np.isin(tokens, range(7)).any()  # only the mixture's separators may be </s>
    tok = load_tokenizer(tokenizer_dir)
    assert [tok.decode(ids.tolist()) for ids, _ in shards.documents("d")] == docs


def test_heldout_split_is_by_document_and_fixed(tmp_path, tokenizer_dir, monkeypatch):
    docs = [f"{d} (copy {k})" for k in range(5) for d in DOCS]
    toml = data_toml(tmp_path, tokenizer_dir, {"d": (docs, 1.0, 1.0)}, heldout=0.2)
    first = prepare(toml, progress=False)["domains"]["d"]["splits"]
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 500)  # other chunking, same split
    second = prepare(toml, out=tmp_path / "again", progress=False)["domains"]["d"]["splits"]
    assert 0 < first["val"]["documents"] < first["train"]["documents"]
    assert first == second
    # Every document lands whole in exactly one split.
    tok, shards = load_tokenizer(tokenizer_dir), open_shards(tmp_path / "again")
    split_docs = {
        s: [tok.decode(ids.tolist()) for ids, _ in shards.documents("d", s)] for s in ("train", "val")
    }
    assert sorted(split_docs["train"] + split_docs["val"]) == sorted(docs)
    assert len(split_docs["val"]) == first["val"]["documents"]


def test_chunks_stay_bounded(tmp_path, tokenizer_dir, monkeypatch):
    """Streaming: work goes to the encoders one chunk (plus one document) at a time, at most two
    chunks per encoding thread in flight; the tokenizers library's own threads are off meanwhile, and
    its setting is given back."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    docs = [f"line {i} " * 30 for i in range(300)]
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 2_000)
    seen, in_flight = [], []
    encode = prepare_module.ChunkEncoder.encoded

    def spying_encode(self, items):
        def read():
            for key, chunk in items:
                if chunk is not None:
                    seen.append(sum(map(len, chunk)))
                yield key, chunk

        written = 0
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
        for key, result in encode(self, read()):
            if result is not None:
                written += 1
                in_flight.append(len(seen) - written)  # chunks read but not yet written
            yield key, result

    monkeypatch.setattr(prepare_module.ChunkEncoder, "encoded", spying_encode)
    toml = data_toml(tmp_path, tokenizer_dir, {"d": (docs, 1.0, 1.0)})
    manifest = prepare(toml, progress=False, workers=2)
    assert max(seen) < 2_000 + max(map(len, docs)) and sum(seen) == sum(map(len, docs))
    assert len(seen) > 10 and max(in_flight) <= 2 * 2
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    d = manifest["domains"]["d"]["splits"]
    assert d["train"]["documents"] + d["val"]["documents"] == len(docs)


def test_rerun_skips_finished_domains(tmp_path, tokenizer_dir, capsys):
    toml = data_toml(tmp_path, tokenizer_dir, {"a": (DOCS, 1.0, 1.0), "b": (DOCS[:10], 1.0, 1.0)})
    prepare(toml, progress=False)
    mtime = (tmp_path / "shards" / "a" / "train-00000.tokens").stat().st_mtime_ns
    capsys.readouterr()
    prepare(toml, progress=False)
    out = capsys.readouterr().out
    assert "a: up to date, skipped" in out and "b: up to date, skipped" in out
    assert (tmp_path / "shards" / "a" / "train-00000.tokens").stat().st_mtime_ns == mtime
    # A changed input is redone, the other domain is not.
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "changed"}) + "\n")
    manifest = prepare(toml, progress=False)
    assert "a: up to date, skipped" in capsys.readouterr().out
    splits = manifest["domains"]["b"]["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 1
    open_shards(tmp_path / "shards")  # checksums of the new files are in the manifest


def test_interrupted_run_never_reads_as_complete(tmp_path, tokenizer_dir, monkeypatch, capsys):
    toml = data_toml(tmp_path, tokenizer_dir, {"a": (DOCS, 1.0, 1.0), "b": (DOCS, 1.0, 1.0)})
    original = prepare_module.SplitWriter.add

    def crash_in_b(self, *args):
        if "/b/.part-" in str(self.paths["tokens"]):
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(prepare_module.SplitWriter, "add", crash_in_b)
    with pytest.raises(KeyboardInterrupt):
        prepare(toml, progress=False)
    with pytest.raises(ShardError, match="incomplete"):
        open_shards(tmp_path / "shards")
    assert not list((tmp_path / "shards" / "b").glob("train-*"))  # only the part's temporary folder
    monkeypatch.undo()
    capsys.readouterr()
    prepare(toml, progress=False)  # the re-run keeps a and finishes b
    assert "a: up to date, skipped" in capsys.readouterr().out
    assert open_shards(tmp_path / "shards").domains == ["a", "b"]


def test_invalid_utf8_is_replaced_counted_and_named(tmp_path, tokenizer_dir, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text\n\nbroken \xff\xfe bytes and a cut \xe4\xb8 one\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "data.toml").write_text(
        f'tokenizer = "{tokenizer_dir}"\nout = "shards"\nheldout_fraction = 0.0\n'
        '[[domains]]\nname = "d"\ninputs = ["bad.txt", "empty.txt"]\n'
    )
    manifest = prepare(tmp_path / "data.toml", progress=False)
    entry = manifest["domains"]["d"]
    assert entry["invalid_utf8"] == {str(bad): 3}
    assert entry["empty_files"] == [str(tmp_path / "empty.txt")]
    out = capsys.readouterr().out
    assert f"{bad}: 3 invalid UTF-8" in out and "empty.txt: no documents" in out
    docs = list(open_shards(tmp_path / "shards").documents("d"))
    text = load_tokenizer(tokenizer_dir).decode(docs[1][0].tolist())
    assert text == "broken \ufffd\ufffd bytes and a cut \ufffd one" and docs[1][1] == len(text.encode())


def test_bad_configs_are_refused_naming_file_and_key(tmp_path, tokenizer_dir):
    path = tmp_path / "data.toml"
    base = f'tokenizer = "{tokenizer_dir}"\nout = "shards"\n'
    domain = '[[domains]]\nname = "d"\ninputs = ["x"]\n'
    cases = {
        base + "shuffle = true\n" + domain: r"data\.toml: unknown key\(s\) \['shuffle'\]",
        base + domain + "weight = 2\n": r"data\.toml\.domains\[0\]: unknown key\(s\) \['weight'\]",
        base + domain + 'epochs = "two"\n': r"domains\[0\]\.epochs: expected float, got 'two'",
        base + '[[domains]]\nname = "d"\ninputs = "x"\n': r"domains\[0\]\.inputs: expected a list, got 'x'",
        base + '[[domains]]\nname = "d"\ninputs = []\n': r"domains\[0\]\.inputs must be a non-empty list",
        base
        + domain
        + 'doc_split = "para"\n': r"doc_split: 'para' is not one of \['line', 'blank_line', 'file'\]",
        base + '[[domains]]\nname = "../d"\ninputs = ["x"]\n': "must be a plain folder name",
        base + domain + "epochs = 0\n": r"domains\[0\]\.epochs = 0\.0 is out of range: it must be > 0",
        base + domain + "proportion = -0.5\n": r"proportion = -0\.5 is out of range: it must be > 0",
        base + domain * 2: r"domain names repeat: \['d', 'd'\]",
        base
        + "heldout_fraction = 1.5\n"
        + domain: r"heldout_fraction = 1\.5 is out of range: it must be >= 0 and < 1",
        base
        + "[[domains]\n": r"not valid TOML: Expected ']]' at the end of an array declaration \(at line 3",
        base: r"missing key\(s\) \['domains'\]",
        'out = "s"\n' + domain: r"missing key\(s\) \['tokenizer'\]",
        base
        + "[dedup]\nnear = true\nthreshold = 1.5\n"
        + domain: r"dedup\.threshold = 1\.5 is out of range: it must be > 0 and < 1",
        base
        + domain
        + "[domains.filters]\nmin_word = 3\n": r"domains\[0\]\.filters: unknown key\(s\) \['min_word'\]",
        base
        + domain
        + "[domains.filters]\nmax_digit_fraction = 2\n": r"max_digit_fraction = 2\.0 is out of range: it must be >= 0 and <= 1",
        base
        + domain
        + "[domains.filters]\nmax_top_ngram_fraction = { two = 0.2 }\n": r"max_top_ngram_fraction: keys are n-gram lengths",
        base + domain + '[domains.filters]\nlanguages = ["xx"]\n': r"filters\.languages: \['xx'\] not known",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=message) as error:
            load_data_config(path)
        assert str(path) in str(error.value)
    path.write_text(base + '[[domains]]\nname = "d"\ninputs = ["x"]\nproportion = 2\n')
    assert load_data_config(path).domains[0].proportion == 2.0


def test_missing_input_is_refused_before_work(tmp_path, tokenizer_dir):
    (tmp_path / "data.toml").write_text(
        f'tokenizer = "{tokenizer_dir}"\nout = "shards"\n[[domains]]\nname = "d"\ninputs = ["nowhere/*.txt"]\n'
    )
    with pytest.raises(FileNotFoundError, match=r"domain 'd': input 'nowhere/\*\.txt' matches no file"):
        prepare(tmp_path / "data.toml", progress=False)
    assert not (tmp_path / "shards").exists()


def test_damaged_compressed_input_names_the_file(tmp_path, tokenizer_dir):
    whole = gzip.compress(("\n\n".join(DOCS)).encode())
    (tmp_path / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "data.toml").write_text(
        f'tokenizer = "{tokenizer_dir}"\nout = "shards"\n[[domains]]\nname = "d"\ninputs = ["cut.txt.gz"]\n'
    )
    with pytest.raises(ValueError, match=r"cut\.txt\.gz: cannot read"):
        prepare(tmp_path / "data.toml", progress=False)
    with pytest.raises(ShardError, match="incomplete"):
        open_shards(tmp_path / "shards")
