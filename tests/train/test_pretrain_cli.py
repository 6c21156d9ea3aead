"""`teleflm pretrain` on real prepared shards: trains, evaluates held-out BPB, and refuses data made
with another tokenizer before any work."""

import json
from pathlib import Path

import pytest

from teleflm.cli.main import main
from teleflm.data.prepare import prepare
from teleflm.data.tokenizer import train_tokenizer
from teleflm.testing import run_ranks
from tests.conftest import sample_text
from tests.data.conftest import data_toml

CONFIG = """
out = "{out}"
[model]
vocab_size = 512
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 2
num_attention_heads = 2
max_position_embeddings = 64
use_mup = true
mup_scale_factor = 0.125
[mup]
lr = 3e-3
matrix_lr = 3e-3
min_lr = 3e-4
[data]
shards = "{shards}"
tokenizer = "{tokenizer}"
context_length = 64
[batch]
global_batch_tokens = 512
micro_batch_size = 4
[schedule]
total_tokens = 5120
warmup_steps = 2
[parallel]
mixed_precision = "fp32"
[checkpoint]
interval_steps = 5
[logging]
eval_interval = 5
eval_sequences = 4
progress_bar = false
"""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepared")
    kjv = sample_text("kjv")[:150_000]
    poems = sample_text("poems")[:40_000]
    tok = train_tokenizer(iter([kjv, poems]), 500, folder / "tok")
    toml = data_toml(
        folder,
        tok,
        {
            "en": ([kjv[i : i + 500] for i in range(0, len(kjv), 500)], 0.7, 5.0),
            "zh": ([poems[i : i + 200] for i in range(0, len(poems), 200)], 0.3, 5.0),
        },
    )
    prepare(toml, progress=False)
    return folder


def test_pretrain_on_prepared_shards(prepared, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(
        CONFIG.format(out=tmp_path / "run", shards=prepared / "shards", tokenizer=prepared / "tok")
    )
    assert main(["pretrain", "--config", str(config)]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val.bpb" in r]
    assert [r["step"] for r in evals] == [5, 10, 10]  # every 5 steps, and the final evaluation
    assert evals[-1]["val.en.bpb"] > 0 and evals[-1]["val.zh.bpb"] > 0
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert (tmp_path / "run" / "export" / "tokenizer.json").is_file()
    assert "val.bpb=" in capsys.readouterr().out

    # `teleflm eval bpb` reproduces the in-loop figures on the same documents: by default on the final
    # checkpoint (it records what the run scored), with the run's settings given on the export.
    settings = ["--context-length", "64", "--max-windows", "4"]
    for model, extra in [
        (tmp_path / "run" / "checkpoints" / "step-00000010", []),
        (tmp_path / "run" / "export", settings),
    ]:
        out = tmp_path / f"{model.name}.json"
        args = ["eval", "bpb", "--model", str(model), "--data", str(prepared / "shards")]
        assert main([*args, *extra, "--json", str(out)]) == 0
        figures = json.loads(out.read_text())
        assert figures["bpb"] == pytest.approx(evals[-1]["val.bpb"], rel=1e-5)
        for domain in ("en", "zh"):
            scored = figures["domains"][domain]
            assert scored["bpb"] == pytest.approx(evals[-1][f"val.{domain}.bpb"], rel=1e-5)
            assert scored["documents"] == evals[-1][f"val.{domain}.documents"] > 0
            assert scored["bytes"] == evals[-1][f"val.{domain}.bytes"] > 0


def test_shards_of_another_tokenizer_refused_before_work(prepared, tmp_path, capsys):
    other = train_tokenizer(iter([sample_text("kjv")[:30_000]]), 400, tmp_path / "other")
    config = tmp_path / "c.toml"
    config.write_text(CONFIG.format(out=tmp_path / "run", shards=prepared / "shards", tokenizer=other))
    assert main(["pretrain", "--config", str(config)]) == 2
    assert "made with another tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def write_config(tmp_path, prepared, name="c.toml", shards="shards", **out) -> Path:
    config = tmp_path / name
    config.write_text(
        CONFIG.format(
            out=tmp_path / (out.get("out") or "run"), shards=prepared / shards, tokenizer=prepared / "tok"
        )
    )
    return config


def final_eval(config, *overrides) -> dict:
    from teleflm.train import stages
    from teleflm.train.config import load_config

    return stages.run(load_config(config, list(overrides)))


def test_held_out_bpb_under_pipeline_parallel_equals_one_process(prepared, tmp_path):
    one = final_eval(write_config(tmp_path, prepared, out="one"))
    pp = run_ranks(2, final_eval, write_config(tmp_path, prepared, "pp.toml", out="pp"), "parallel.pp=2")
    for rank in pp:  # every stage reports the figures
        assert rank["val.bpb"] == pytest.approx(one["val.bpb"], rel=1e-5)
        assert rank["val.zh.documents"] == one["val.zh.documents"] > 0


def test_evaluation_masks_documents_as_training_does(prepared, tmp_path, capsys):
    # A wide init: logits that depend on the context, so attention across documents shows.
    wide = ["mup.std=0.5", "mup.matrix_std=0.5", "logging.eval_sequences=16"]
    result = final_eval(write_config(tmp_path, prepared), "data.document_mask=true", *wide)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000010"
    args = ["eval", "bpb", "--model", str(checkpoint), "--data", str(prepared / "shards"), "--json"]
    assert main([*args, str(tmp_path / "masked.json")]) == 0  # the run's mask, recorded in the checkpoint
    assert main([*args, str(tmp_path / "plain.json"), "--no-document-mask"]) == 0
    masked, plain = (json.loads((tmp_path / f).read_text())["bpb"] for f in ("masked.json", "plain.json"))
    assert result["val.bpb"] == pytest.approx(masked, rel=1e-5)
    assert result["val.bpb"] != pytest.approx(plain, rel=1e-3)


def test_evaluation_overlaps_windows_as_the_run_set_it(prepared, tmp_path):
    wide = ["mup.std=0.5", "mup.matrix_std=0.5", "logging.eval_sequences=8"]  # context-dependent logits
    result = final_eval(write_config(tmp_path, prepared), "logging.eval_stride=16", *wide)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000010"
    args = ["eval", "bpb", "--model", str(checkpoint), "--data", str(prepared / "shards"), "--json"]
    assert main([*args, str(tmp_path / "sliding.json")]) == 0  # the run's stride, recorded in the checkpoint
    assert main([*args, str(tmp_path / "end_to_end.json"), "--stride", "64"]) == 0
    sliding, end_to_end = (
        json.loads((tmp_path / f).read_text()) for f in ("sliding.json", "end_to_end.json")
    )
    assert result["val.bpb"] == pytest.approx(sliding["bpb"], rel=1e-5)
    assert result["val.bpb"] != pytest.approx(end_to_end["bpb"], rel=1e-3)
    for domain in ("en", "zh"):  # the same documents, each token once
        assert sliding["domains"][domain]["tokens"] == end_to_end["domains"][domain]["tokens"] > 0
        assert sliding["domains"][domain]["bytes"] == result[f"val.{domain}.bytes"]


@pytest.fixture(scope="module")
def no_held_out(prepared):
    """The same text prepared without a held-out split."""
    toml = prepared / "data.toml"
    no_val = prepared / "data-no-val.toml"
    no_val.write_text(
        toml.read_text()
        .replace('out = "shards"', 'out = "shards-no-val"')
        .replace("heldout_fraction = 0.1", "heldout_fraction = 0.0")
    )
    prepare(no_val, progress=False)
    return prepared / "shards-no-val"


def test_an_empty_held_out_split_still_finishes_and_exports(prepared, no_held_out, tmp_path):
    result = final_eval(write_config(tmp_path, prepared, shards=no_held_out.name))
    assert result["step"] == 10 and "val.bpb" not in result
    assert result["val.en.documents"] == result["val.zh.documents"] == 0
    assert (tmp_path / "run" / "export" / "config.json").is_file()
    # A resume after the last checkpoint evaluates again, and finishes again.
    assert final_eval(write_config(tmp_path, prepared, shards=no_held_out.name))["step"] == 10


def test_a_search_objective_without_held_out_data_is_an_error(prepared, no_held_out, tmp_path):
    from teleflm.config import read_toml
    from teleflm.tune.runs import RunData, scored_run

    raw = read_toml(write_config(tmp_path, prepared, shards=no_held_out.name))
    with pytest.raises(ValueError, match="no held-out bits per byte"):
        scored_run(raw, tmp_path / "scored", RunData())
