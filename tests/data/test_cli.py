"""The two commands end to end: `teleflm tokenizer train`, then `teleflm data prepare` and `inspect`."""

import json

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
