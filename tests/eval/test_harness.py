"""`teleflm eval harness`: lm-evaluation-harness on the shipped local tasks, in a fresh process."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from teleflm.eval.harness import task_configs

TASKS = ["teleflm_kjv_next_verse", "teleflm_poem_next_line", "teleflm_kjv_word_order"]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A random tiny model with a chat tokenizer, exported as a Hugging Face folder."""
    import torch

    from teleflm.model import TeleFLMForCausalLM
    from teleflm.model.io import export_hf
    from teleflm.testing import tiny_config
    from tests.sft.common import train_chat_tokenizer

    root = tmp_path_factory.mktemp("harness")
    tokenizer = train_chat_tokenizer(root / "tok")
    torch.manual_seed(0)
    model = TeleFLMForCausalLM(tiny_config(vocab_size=320, max_position_embeddings=1024))
    return export_hf(model, root / "export", tokenizer_dir=tokenizer)


def test_shipped_tasks_are_local_four_way_choices():
    configs = task_configs()
    assert set(TASKS) <= set(configs)
    for name in TASKS:
        (path,) = configs[name]["dataset_kwargs"]["data_files"].values()
        items = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
        assert 30 <= len(items) <= 200
        assert all(len(i["choices"]) == 4 and len(set(i["choices"])) == 4 for i in items)
        assert all(0 <= i["answer"] < 4 for i in items)


def test_harness_runs_on_an_export_in_a_fresh_process(tiny_export, tmp_path):
    out = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, "-m", "teleflm.cli.main", "eval", "harness", "--model", str(tiny_export)]
        + ["--tasks", ",".join(TASKS), "--limit", "3", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for name in TASKS:
        scores = report["harness"][name]
        assert scores["n"] == 3 and scores["chance"] == 0.25
        assert 0 <= scores["acc"] <= 1 and 0 <= scores["acc_norm"] <= 1
        assert f"| {name} | 3 | acc |" in (out / "report.md").read_text()


def test_unknown_task_is_refused_with_the_known_ones(tiny_export, tmp_path):
    from teleflm.cli.main import main

    code = main(
        ["eval", "harness", "--model", str(tiny_export), "--tasks", "arc_easy", "--out", str(tmp_path)]
    )
    assert code == 2


def test_padded_ids_get_no_mass_in_the_harness_nor_in_generate(tmp_path):
    """An export whose padded embedding rows (past the tokenizer's 320 ids) would win every step: the
    harness's model gives them -inf, and `generate` with the export's own settings never emits one."""
    import torch
    from transformers import AutoModelForCausalLM

    from teleflm.eval.harness import masked_export
    from teleflm.model import TeleFLMForCausalLM
    from teleflm.model.io import export_hf
    from teleflm.testing import tiny_config
    from tests.sft.common import train_chat_tokenizer

    real, padded = 320, 336
    torch.manual_seed(0)
    model = TeleFLMForCausalLM(tiny_config(vocab_size=padded, max_position_embeddings=64))
    with torch.no_grad():
        model.lm_head.weight[:real] = 0.0  # real ids: uniform
        model.lm_head.weight[real:] = 5.0 * torch.randn(padded - real, model.config.hidden_size)
    export = export_hf(model, tmp_path / "export", tokenizer_dir=train_chat_tokenizer(tmp_path / "tok"))
    ids = torch.tensor([[5, 17, 42, 8]])
    scored, _ = masked_export(export)
    with torch.no_grad():
        logits = scored(input_ids=ids).logits
    assert torch.isinf(logits[..., real:]).all() and (logits[..., real:] < 0).all()
    log_probs = torch.log_softmax(logits, dim=-1)[..., :real]
    assert torch.allclose(log_probs, torch.full_like(log_probs, -math.log(real)), atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        assert plain(input_ids=ids).logits[0, -1].argmax() >= real  # what an unsuppressed step picks
        out = plain.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
        )
    assert (out[0, ids.shape[1] :] < real).all()
