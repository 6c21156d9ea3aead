"""`teleflm sft` end to end: a tiny base model learns a synthetic instruction format; `teleflm chat`."""

import json
import os
import subprocess
import sys

import pytest

from teleflm.cli.main import main
from teleflm.config import ConfigError
from teleflm.sft.config import load_sft_config
from tests.sft.common import (
    SYSTEM,
    answer_accuracy,
    pretrain_base,
    sft_toml,
    task,
    word_pairs,
    write_chat_set,
)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, chat_tokenizer_dir):
    """(base export, fine-tuned export): the base pre-trained on plain text over the task's words,
    then `teleflm sft` on the chat set of the training pairs."""
    root = tmp_path_factory.mktemp("sft")
    base = pretrain_base(root / "base", chat_tokenizer_dir)
    data = write_chat_set(root / "chat.jsonl", word_pairs()[0])
    assert main(["sft", "--config", str(sft_toml(root / "sft.toml", base, data, root / "sft"))]) == 0
    return base, root / "sft" / "export"


def test_fine_tuned_model_answers_in_the_format(tuned):
    base, export = tuned
    train, held_out = word_pairs()
    scores = {
        "base held-out": answer_accuracy(base, held_out),
        "tuned train": answer_accuracy(export, train),
        "tuned held-out": answer_accuracy(export, held_out),
    }
    print(scores)
    assert scores["base held-out"] <= 0.1
    assert scores["tuned train"] >= 0.8
    assert scores["tuned held-out"] >= 0.5  # pairs never seen in fine-tuning
    report = json.loads((export.parent / "sft_data.json").read_text())
    assert report["conversations"] == len(train) and report["skipped_lines"] == []


def test_chat_prompt_prints_only_the_answer(tuned):
    from teleflm.model.io import load_pretrained
    from teleflm.sft.chat import ChatSession

    _, export = tuned
    user, _ = task(*word_pairs()[0][0])
    model, tokenizer = load_pretrained(export, device="cpu")
    expected = ChatSession(model, tokenizer, system=SYSTEM, max_new_tokens=16).reply(user)
    run = subprocess.run(
        [sys.executable, "-m", "teleflm.cli.main", "chat", "--model", str(export)]
        + ["--system", SYSTEM, "--prompt", user, "--max-new-tokens", "16"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=True,
    )
    assert expected and run.stdout == expected + "\n"


def test_interactive_chat_keeps_history(tuned):
    _, export = tuned
    run = subprocess.run(
        [sys.executable, "-m", "teleflm.cli.main", "chat", "--model", str(export), "--system", SYSTEM]
        + ["--max-new-tokens", "12"],
        input="red cat\nblue dog\n/reset\npink fish\n",
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
        check=True,
    )
    assert run.stdout.count("bot> ") == 3 and "(conversation forgotten)" in run.stderr


def test_config_refuses_what_cannot_work(tmp_path, tuned):
    base, _ = tuned
    data = write_chat_set(tmp_path / "chat.jsonl", word_pairs()[0][:2])
    path = sft_toml(tmp_path / "sft.toml", base, data, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"no \[model\]"):
        load_sft_config(path, ["model.hidden_size=128"])
    with pytest.raises(ConfigError, match="document_mask is not supported with pipeline parallel"):
        load_sft_config(path, ["parallel.pp=2"])
    with pytest.raises(ConfigError, match="sft.on_error must be"):
        load_sft_config(path, ["sft.on_error=ignore"])
    with pytest.raises(ConfigError, match="is not a checkpoint or export folder"):
        load_sft_config(path, [f'sft.init="{tmp_path / "missing"}"'])
    cfg = load_sft_config(path)
    assert cfg.train.data.document_mask and cfg.train.schedule.total_tokens == 0


def test_init_from_a_checkpoint_or_its_export_is_the_same_model(tmp_path, tuned):
    import torch

    from teleflm.sft.run import source_state_dict
    from teleflm.train.checkpoint import latest_checkpoint

    base, _ = tuned
    step = latest_checkpoint(base.parent / "checkpoints")
    data = write_chat_set(tmp_path / "chat.jsonl", word_pairs()[0][:2])
    from_export = load_sft_config(sft_toml(tmp_path / "a.toml", base, data, tmp_path / "a"))
    from_step = load_sft_config(sft_toml(tmp_path / "b.toml", step, data, tmp_path / "b"))
    export_only = ("architectures", "auto_map", "dtype")  # what an export records about itself
    shapes = [
        {k: v for k, v in c.train.model_config().to_dict().items() if k not in export_only}
        for c in (from_export, from_step)
    ]
    assert shapes[0] == shapes[1]
    assert load_tokenizer_hash(from_export) == load_tokenizer_hash(from_step)
    weights, step_weights = source_state_dict(base), source_state_dict(step)
    assert weights.keys() == step_weights.keys()
    assert all(torch.equal(weights[name], step_weights[name]) for name in weights)


def load_tokenizer_hash(cfg) -> str:
    from teleflm.data.tokenizer import tokenizer_hash

    return tokenizer_hash(cfg.train.data.tokenizer)


def _sft_losses(config: str, overrides: list[str]) -> dict[int, float]:
    from teleflm.sft.config import load_sft_config
    from teleflm.sft.run import run_sft
    from teleflm.testing import logged_losses

    cfg = load_sft_config(config, overrides)
    run_sft(cfg, log=lambda _: None)
    return logged_losses(cfg.train.out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [["parallel.dp_shard=2", "batch.micro_batch_size=4"], ["parallel.tp=2", "parallel.dp_shard=1"]],
    ids=["dp2", "tp2"],
)
def test_fine_tuning_under_dp2_and_tp2_matches_one_process(tuned, tmp_path, layout):
    """Starting weights land in each rank's shard or slice, and the masked loss is normalised over
    the global batch: the losses of 4 steps equal one process's."""
    from teleflm.testing import run_ranks

    base, _ = tuned
    data = write_chat_set(tmp_path / "chat.jsonl", word_pairs()[0])
    config = str(sft_toml(tmp_path / "sft.toml", base, data, tmp_path / "one"))
    short = [f"schedule.total_tokens={64 * 8 * 4}", "checkpoint.export_at_end=false"]
    reference = _sft_losses(config, short)
    losses = run_ranks(2, _sft_losses, config, [*short, *layout, f"out='{tmp_path / 'two'}'"])[0]
    assert sorted(reference) == sorted(losses) == [1, 2, 3, 4]
    for step in reference:
        assert losses[step] == pytest.approx(reference[step], rel=1e-4), (step, losses, reference)
