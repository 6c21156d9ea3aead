"""The two commands end to end: `teleflm tokenizer train`, then `teleflm data prepare` and `inspect`."""

import json

import pytest

from teleflm.cli.main import main
from teleflm.data.shards import open_shards
from teleflm.data.tokenizer import tokenizer_hash


def test_tokenizer_train_then_prepare_then_inspect(tmp_path, texts, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "en.txt").write_text(texts["en"][:40_000])
    (corpus / "poems.jsonl").write_text(
        "".join(
            json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in texts["poems"][:20_000].split("\n\n")
        )
    )
    assert main(["tokenizer", "train", "--input", str(corpus / "*.txt"), str(corpus / "*.jsonl"),
                 "--vocab-size", "600", "--out", str(tmp_path / "tok")]) == 0  # fmt: skip
    tok_hash = tokenizer_hash(tmp_path / "tok")
    assert tok_hash in capsys.readouterr().out
    (tmp_path / "data.toml").write_text(
        'tokenizer = "tok"\nout = "shards"\nheldout_fraction = 0.1\n'
        '[[domains]]\nname = "en"\ninputs = ["corpus/*.txt"]\nproportion = 2\n'
        '[[domains]]\nname = "poems"\ninputs = ["corpus/*.jsonl"]\nproportion = 1\nepochs = 2.5\n'
    )
    assert main(["data", "prepare", "--config", str(tmp_path / "data.toml"), "--quiet"]) == 0
    shards = open_shards(tmp_path / "shards", expected_tokenizer_hash=tok_hash)
    assert [(m.name, m.proportion, m.epochs) for m in shards.mixture()] == [
        ("en", 2.0, 1.0),
        ("poems", 1.0, 2.5),
    ]
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "shards"), "--tokenizer", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert f"{shards.split_info('en')['tokens']:,}" in out and "poems" in out


def test_user_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "data.toml").write_text(
        'tokenizer = "tok"\nout = "s"\nepochs = 1\n[[domains]]\nname = "d"\ninputs = ["x"]\n'
    )
    assert main(["data", "prepare", "--config", str(tmp_path / "data.toml")]) == 2
    err = capsys.readouterr().err
    assert (
        "unknown key(s) ['epochs']" in err and str(tmp_path / "data.toml") in err and "Traceback" not in err
    )
    assert (
        main(["tokenizer", "train", "--input", str(tmp_path / "none*.txt"), "--out", str(tmp_path / "t")])
        == 2
    )
    assert "matches no file" in capsys.readouterr().err


def test_tokenizer_train_says_what_it_built_and_refuses_empty_input(tmp_path, texts, capsys):
    """Before, an empty file gave "tokenizer of 80000 entries" and wrote 263, and 1 MB of random
    bytes trained silently."""
    import random

    (tmp_path / "empty.txt").write_text("")
    command = ["tokenizer", "train", "--vocab-size", "80000"]
    assert main([*command, "--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "t0")]) == 2
    assert f"{tmp_path / 'empty.txt'}: no text to train a tokenizer on" in capsys.readouterr().err
    assert not (tmp_path / "t0").exists()

    (tmp_path / "small.txt").write_text(texts["en"][:20_000])
    with pytest.warns(UserWarning, match=r"small\.txt: the tokenizer has \d+ entries, not the 80000 asked"):
        assert main([*command, "--input", str(tmp_path / "small.txt"), "--out", str(tmp_path / "t1")]) == 0
    size = len(json.loads((tmp_path / "t1" / "tokenizer.json").read_text())["model"]["vocab"])
    assert f"tokenizer of {size} entries from 1 file(s)" in capsys.readouterr().out and size < 80_000

    (tmp_path / "noise.bin").write_bytes(random.Random(0).randbytes(1 << 20))
    with pytest.warns(UserWarning, match=r"noise\.bin: \d+% of the characters are invalid UTF-8"):
        assert (
            main(
                [
                    *command[:2],
                    "--vocab-size",
                    "400",
                    "--input",
                    str(tmp_path / "noise.bin"),
                    "--out",
                    str(tmp_path / "t2"),
                ]
            )
            == 0
        )
