"""Hyper-parameter search: resumable table, best set, and muP transfer to a wider config."""

import json
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from teleflm.cli.main import main
from teleflm.mup.runs import to_toml
from teleflm.mup.search import load_space, planned_trials, read_table, search, transfer, write_results
from tests.train.common import CONTEXT, pattern_sequences

REPO = Path(__file__).resolve().parents[2]


def proxy_config(out: Path) -> dict:
    """A width-32 muP proxy: 6 steps of 4 x 32 tokens (about a second per trial)."""
    return {
        "out": str(out / "run"),
        "model": dict(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=CONTEXT,
            use_mup=True,
            mup_scale_factor=1.0,
            output_mult=1.0,
        ),
        "mup": {"lr": 1e-2, "matrix_lr": 1e-2, "min_lr": 1e-3, "std": 0.02, "matrix_std": 0.02},
        "data": {"context_length": CONTEXT},
        "batch": {"global_batch_tokens": CONTEXT * 4, "micro_batch_size": 4},
        "schedule": {"total_tokens": CONTEXT * 4 * 6, "warmup_steps": 1},
        "parallel": {"mixed_precision": "fp32"},
    }


SPACE = """
method = "grid"
parallel = 1
[params.lr]
values = [1e-3, 1e-1]
[params.output_mult]
values = [0.5, 2.0]
[derived]
matrix_lr = "lr"
min_lr = "0.1 * lr"
"""


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "proxy.toml").write_text(to_toml(proxy_config(tmp_path)))
    (tmp_path / "space.toml").write_text(SPACE)
    np.save(tmp_path / "seqs.npy", pattern_sequences(64))
    return tmp_path


def test_space_plans_a_grid_with_derived_values(setup):
    plan = planned_trials(load_space(setup / "space.toml"))
    assert len(plan) == 4
    assert plan[1] == {"lr": 1e-3, "output_mult": 2.0, "matrix_lr": 1e-3, "min_lr": pytest.approx(1e-4)}


def test_bad_space_is_refused(tmp_path):
    (tmp_path / "s.toml").write_text('[params.lr]\nvalues = [1e-3]\n[derived]\nmin_lr = "0.1 * std"\n')
    with pytest.raises(ValueError, match="'std' is not a searched parameter"):
        load_space(tmp_path / "s.toml")
    (tmp_path / "s.toml").write_text("[params.momentum]\nvalues = [0.9]\n")
    with pytest.raises(ValueError, match="not one of the searched"):
        load_space(tmp_path / "s.toml")


def test_interrupted_table_resumes_without_redoing_trials(setup):
    space = load_space(setup / "space.toml")
    raw = tomllib.loads((setup / "proxy.toml").read_text())
    out = setup / "search"
    first = search(raw, space, out, str(setup / "seqs.npy"), log=lambda _: None)
    assert [r["trial"] for r in first] == list(range(4))
    # Keep two finished trials and cut the third line half-way, as a kill during a write would.
    table = out / "trials.jsonl"
    lines = table.read_text().splitlines(keepends=True)
    table.write_text("".join(lines[:2]) + lines[2][:25])
    messages = []
    resumed = search(raw, space, out, str(setup / "seqs.npy"), log=messages.append)
    assert "2 already in" in messages[0] and "2 to run" in messages[0]
    assert len(read_table(table)) == 4
    assert [json.loads(line) for line in lines[:2]] == [
        r for r in resumed if r["trial"] in {json.loads(line)["trial"] for line in lines[:2]}
    ]  # untouched, not re-run
    # The loss itself is reproducible: re-run trials score as in the first search.
    assert [r["objective"] for r in resumed] == pytest.approx([r["objective"] for r in first], rel=1e-4)
    best = write_results(raw, resumed, out, "proxy.toml")
    assert best["objective"] == min(r["objective"] for r in resumed)
    assert tomllib.loads((out / "best.toml").read_text())["mup"]["lr"] == best["mup"]["lr"]
    assert (out / "search.md").exists() and (out / "search.png").exists() and (out / "trials.csv").exists()


# The search CLI in a process that SIGKILLs its own process group (itself and its trial workers) right
# after the second trial record is on disk: the kill lands at that point, whatever the timing.
KILL_AFTER_TWO_RECORDS = """
import os, signal, sys
import teleflm.mup.search as search

append, written = search.append_record, []

def append_then_die(path, record):
    append(path, record)
    written.append(record)
    if len(written) == 2:
        os.killpg(0, signal.SIGKILL)

search.append_record = append_then_die
from teleflm.cli.main import main
main(sys.argv[1:])
"""


def test_killed_search_picks_up_where_it_stopped(setup):
    out = setup / "search"
    args = ["mup", "search", "--config", str(setup / "proxy.toml"), "--space", str(setup / "space.toml")]
    args += ["--out", str(out), "--sequences", str(setup / "seqs.npy"), "--parallel", "2"]
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_TWO_RECORDS, *args],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL
    done_before = read_table(out / "trials.jsonl")
    assert len(done_before) == 2
    assert main(args) == 0
    records = read_table(out / "trials.jsonl")
    assert sorted(r["trial"] for r in records) == list(range(4))  # each trial exactly once
    assert records[:2] == done_before
    assert (out / "best.toml").exists()


def test_transfer_keeps_values_and_sets_the_width_multiplier(setup, tmp_path):
    best = {
        "proxy_width": 32.0,
        "use_mup": True,
        "mup": {"lr": 3e-3, "matrix_lr": 3e-3, "min_lr": 3e-4, "std": 0.01, "matrix_std": 0.02},
        "model": {"input_mult": 1.0, "output_mult": 2.0},
    }
    (tmp_path / "best.toml").write_text(to_toml(best))
    big = proxy_config(tmp_path)
    big["model"].update(hidden_size=256, intermediate_size=512, num_attention_heads=16, mup_scale_factor=1.0)
    (tmp_path / "big.toml").write_text(to_toml(big))
    args = ["mup", "transfer", "--best", str(tmp_path / "best.toml"), "--to", str(tmp_path / "big.toml")]
    assert main([*args, "--out", str(tmp_path / "big-mup.toml")]) == 0
    written = tomllib.loads((tmp_path / "big-mup.toml").read_text())
    assert written["mup"] == best["mup"]
    assert written["model"]["output_mult"] == 2.0 and written["model"]["mup_scale_factor"] == 8.0
    report = (tmp_path / "big-mup.md").read_text()
    assert "| matrix | 0.003 | 0.000375 |" in report  # matrix lr / width_mult 8; embedding keeps lr
    assert "| embedding | 0.003 | 0.003 |" in report and (tmp_path / "big-mup.png").is_file()
    big["model"]["use_mup"] = False
    with pytest.raises(ValueError, match="use_mup = false"):
        transfer(best, big)


def test_held_out_loss_gives_padded_ids_no_mass():
    import torch
    import torch.nn.functional as F

    from teleflm.model import TeleFLMForCausalLM
    from teleflm.mup.runs import heldout_loss
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = TeleFLMForCausalLM(tiny_config(vocab_size=128))
    with torch.no_grad():
        model.lm_head.weight[100:] *= 50  # padded rows (past a 100-id tokenizer) with large logits
    sequences = np.random.default_rng(0).integers(4, 100, (4, 17))
    tokens = torch.from_numpy(sequences)
    with torch.no_grad():
        logits = model(input_ids=tokens[:, :-1]).logits
    real = F.cross_entropy(logits[..., :100].flatten(0, 1), tokens[:, 1:].flatten()).item()
    padded = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
    assert heldout_loss(model, sequences, real_vocab_size=100) == pytest.approx(real, rel=1e-6)
    assert padded > real + 0.1
