"""Reading shards: what prepare wrote comes back, and damage or a wrong tokenizer is refused by name."""

import json
import shutil

import numpy as np
import pytest

from teleflm.cli.main import main
from teleflm.data import shards as shards_module
from teleflm.data.mixture import MixtureStream
from teleflm.data.shards import MANIFEST, ShardError, open_shards, verify_shards
from teleflm.data.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer


def test_arrays_agree_with_the_manifest_and_the_text(shards_dir, tokenizer_dir, texts):
    shards = open_shards(shards_dir, expected_tokenizer_hash=tokenizer_hash(tokenizer_dir))
    assert shards.domains == ["en", "code", "poems"]
    tok = load_tokenizer(tokenizer_dir)
    for domain in shards.domains:
        for split in ("train", "val"):
            info = shards.split_info(domain, split)
            offsets, sizes = shards.doc_offsets(domain, split), shards.doc_bytes(domain, split)
            assert len(offsets) == info["documents"] + 1 and offsets[0] == 0 and offsets[-1] == info["tokens"]
            assert np.all(np.diff(offsets) > 0) and sizes.sum() == info["bytes"]
        ids, n_bytes = next(shards.documents(domain))
        text = tok.decode(ids.tolist())
        assert len(text.encode()) == n_bytes and text in texts[domain]


@pytest.fixture
def copy(tmp_path, shards_dir):
    shutil.copytree(shards_dir, tmp_path / "shards")
    return tmp_path / "shards"


def test_altered_shard_is_refused_naming_the_file(copy):
    tokens = copy / "en" / "train-00000.tokens"
    data = bytearray(tokens.read_bytes())
    data[100] ^= 0xFF
    tokens.write_bytes(bytes(data))
    shards = open_shards(copy)  # same size: opening (every start of a run) reads no data
    with pytest.raises(ShardError, match=r"en/train-00000\.tokens: checksum mismatch"):
        verify_shards(shards)
    assert main(["data", "verify", str(copy)]) == 2


def test_opening_shards_hashes_nothing_and_verify_hashes_everything(shards_dir, monkeypatch):
    """A run starts (and resumes, and grows) by opening its shards: at 8 TB, hashing them would take
    hours per start on every rank."""
    hashed = []
    monkeypatch.setattr(shards_module, "file_sha256", lambda path: hashed.append(path) or "x")
    shards = open_shards(shards_dir)
    MixtureStream(shards, shards.mixture(), context_length=16, seed=0).next_sequences(4)
    assert hashed == []
    with pytest.raises(ShardError, match="checksum mismatch"):
        verify_shards(shards)
    monkeypatch.undo()
    verify_shards(shards)
    assert main(["data", "verify", str(shards_dir)]) == 0


def test_truncated_or_missing_shard_is_refused(copy):
    offsets = copy / "code" / "val-00000.offsets"
    offsets.write_bytes(offsets.read_bytes()[:-8])
    with pytest.raises(
        ShardError, match=r"code/val-00000\.offsets has \d+ bytes, the manifest says \d+: truncated"
    ):
        open_shards(copy)
    offsets.unlink()
    with pytest.raises(ShardError, match=r"code/val-00000\.offsets is missing"):
        open_shards(copy)


def test_shards_of_another_tokenizer_are_refused_with_both_hashes(shards_dir, tmp_path, texts):
    other = train_tokenizer(iter([texts["en"][:20_000]]), 600, tmp_path / "other")
    expected = tokenizer_hash(other)
    with pytest.raises(ShardError, match="made with another tokenizer") as error:
        open_shards(shards_dir, expected_tokenizer_hash=expected)
    manifest = json.loads((shards_dir / MANIFEST).read_text())
    assert expected in str(error.value) and manifest["tokenizer_hash"] in str(error.value)


def test_not_a_shards_folder(tmp_path):
    with pytest.raises(ShardError, match="no manifest.json"):
        open_shards(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        open_shards(tmp_path)
