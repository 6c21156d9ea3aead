"""`teleflm export`: a model folder (export or official layout) to a Hugging Face folder."""

import json

import torch
from safetensors.torch import load_file

from teleflm.cli.main import main
from teleflm.model.io import load_pretrained
from teleflm.testing import write_official_layout
from tests.model.reference import random_model

IDS = torch.arange(4, 40)[None]


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_export_official_layout(tmp_path, sentencepiece_dir, capsys):
    model = random_model(vocab_size=2048, use_mup=True, output_mult=0.5, mup_scale_factor=16.0)
    official = write_official_layout(model, sentencepiece_dir / "tokenizer.model", tmp_path / "official")
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(official), "--out", str(out)]) == 0
    assert f"to {out}" in capsys.readouterr().out

    loaded, tokenizer = load_pretrained(out, device="cpu")
    assert torch.equal(logits(loaded), logits(model))
    # The tokenizer comes along from the model folder when --tokenizer is not given.
    assert tokenizer is not None and len(tokenizer) == 2000
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_teleflm.TeleFLMForCausalLM"
    )


def test_export_bf16_with_a_separate_tokenizer(tmp_path, sentencepiece_dir):
    source = tmp_path / "source"
    assert (
        main(
            [
                "export",
                "--model",
                str(
                    write_official_layout(
                        random_model(vocab_size=2048),
                        sentencepiece_dir / "tokenizer.model",
                        tmp_path / "official",
                    )
                ),
                "--out",
                str(source),
            ]
        )
        == 0
    )
    out = tmp_path / "bf16"
    args = [
        "export",
        "--model",
        str(source),
        "--out",
        str(out),
        "--dtype",
        "bf16",
        "--tokenizer",
        str(sentencepiece_dir),
    ]
    assert main(args) == 0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert (out / "tokenizer.model").read_bytes() == (sentencepiece_dir / "tokenizer.model").read_bytes()


def test_non_empty_target_needs_overwrite(tmp_path, capsys):
    from teleflm.model.io import export_hf

    source = export_hf(random_model(), tmp_path / "source")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", "--model", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        f"teleflm export: error: export target {out} exists and is not empty" in err and "--overwrite" in err
    )
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "source"]

    assert main(["export", "--model", str(source), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()


def test_broken_checkpoint_is_a_clear_error(tmp_path, capsys):
    from teleflm.model.io import export_hf

    source = export_hf(random_model(), tmp_path / "source")
    (source / "model.safetensors").write_bytes(b"not a tensor file")
    out = tmp_path / "out"
    assert main(["export", "--model", str(source), "--out", str(out)]) == 2
    assert f"{source / 'model.safetensors'}: not a valid safetensors file" in capsys.readouterr().err
    assert not out.exists()


def test_missing_model_folder(tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'nowhere'}: no such model folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
