"""Embeddings: the same vector alone and inside a padded batch, pooling as documented, the model
`AutoModel` loads from an export gives the same, and `teleflm embed` writes them."""

import json

import numpy as np
import pytest
import torch

from teleflm.cli.main import main
from teleflm.serve.embed import embed

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "Amen.",
    "And the evening and the morning were the first day, and God saw the light, that it was good.",
    "床前明月光",
]


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_same_vector_alone_and_in_a_batch(model_and_tokenizer, pooling):
    model, tokenizer = model_and_tokenizer
    batched, counts = embed(model, tokenizer, TEXTS, pooling=pooling, batch_size=4)
    assert len(set(counts)) == len(TEXTS)  # lengths differ, so the batch is padded
    for i, text in enumerate(TEXTS):
        alone, _ = embed(model, tokenizer, [text], pooling=pooling)
        assert torch.allclose(batched[i], alone[0], atol=1e-5), text


def test_pooling_of_the_final_hidden_states(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0]
    mean, _ = embed(model, tokenizer, TEXTS[:1], pooling="mean")
    last, _ = embed(model, tokenizer, TEXTS[:1], pooling="last", normalize=True)
    assert torch.allclose(mean[0], hidden.mean(dim=0), atol=1e-5)
    assert torch.allclose(last[0], hidden[-1] / hidden[-1].norm(), atol=1e-5)


def test_automodel_of_an_export_gives_the_same_vectors(export_dir, model_and_tokenizer):
    from transformers import AutoModel

    model, tokenizer = model_and_tokenizer
    features = AutoModel.from_pretrained(str(export_dir), trust_remote_code=True)
    assert type(features).__name__ == "TeleFLMModel"
    ours, _ = embed(model, tokenizer, TEXTS, normalize=True)
    theirs, _ = embed(features.eval(), tokenizer, TEXTS, normalize=True)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_empty_text_is_refused(model_and_tokenizer):
    with pytest.raises(ValueError, match="text 1 is empty"):
        embed(*model_and_tokenizer, ["a", ""])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cli_writes_npy_and_jsonl(tmp_path, export_dir, model_and_tokenizer):
    records = [{"text": t, "id": i} for i, t in enumerate(TEXTS[:3])] + [TEXTS[3]]  # objects or strings
    source = write_jsonl(tmp_path / "in.jsonl", records)
    expected, _ = embed(*model_and_tokenizer, TEXTS, pooling="last", normalize=True)
    common = ["embed", "--model", str(export_dir), "--input", str(source), "--pooling", "last", "--normalize"]
    assert main([*common, "--out", str(tmp_path / "out.npy"), "--batch-size", "3"]) == 0
    assert np.allclose(np.load(tmp_path / "out.npy"), expected.numpy(), atol=1e-5)
    assert main([*common, "--out", str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert np.allclose([r["embedding"] for r in rows], expected.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "a"}', "", '{"text": "b"', '{"text": "c"}'], "in.jsonl:3: not valid JSON"),
        (
            ['{"text": "a"}', '{"body": "b"}'],
            "in.jsonl:2: expected a string or an object with a string 'text'",
        ),
        (["", ""], "in.jsonl: no texts"),
    ],
)
def test_cli_names_the_bad_line(tmp_path, export_dir, capsys, lines, message):
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    assert (
        main(["embed", "--model", str(export_dir), "--input", str(source), "--out", str(tmp_path / "o.npy")])
        == 2
    )
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


def test_cli_refuses_an_unknown_output_format(tmp_path, export_dir, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", ["a"])
    assert (
        main(["embed", "--model", str(export_dir), "--input", str(source), "--out", str(tmp_path / "o.csv")])
        == 2
    )
    assert "must end in .npy or .jsonl" in capsys.readouterr().err
