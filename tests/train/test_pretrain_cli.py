"""`teleflm pretrain` on real prepared shards: trains, evaluates held-out BPB, and refuses data made
with another tokenizer before any work."""

import json

import pytest

from teleflm.cli.main import main
from teleflm.data.prepare import prepare
from teleflm.data.tokenizer import train_tokenizer
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

    # `teleflm eval bpb` on the final checkpoint and on the export reproduces the in-loop figures.
    for model in [tmp_path / "run" / "checkpoints" / "step-00000010", tmp_path / "run" / "export"]:
        out = tmp_path / f"{model.name}.json"
        args = ["eval", "bpb", "--model", str(model), "--data", str(prepared / "shards")]
        assert main([*args, "--context-length", "64", "--max-windows", "4", "--json", str(out)]) == 0
        figures = json.loads(out.read_text())
        assert figures["bpb"] == pytest.approx(evals[-1]["val.bpb"], rel=1e-5)
        assert figures["domains"]["zh"]["bpb"] == pytest.approx(evals[-1]["val.zh.bpb"], rel=1e-5)


def test_shards_of_another_tokenizer_refused_before_work(prepared, tmp_path, capsys):
    other = train_tokenizer(iter([sample_text("kjv")[:30_000]]), 400, tmp_path / "other")
    config = tmp_path / "c.toml"
    config.write_text(CONFIG.format(out=tmp_path / "run", shards=prepared / "shards", tokenizer=other))
    assert main(["pretrain", "--config", str(config)]) == 2
    assert "made with another tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
