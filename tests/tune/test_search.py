"""Hyper-parameter search: resumable table, best set, and muP transfer to a wider config."""

import copy
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from teleflm.cli.main import main
from teleflm.testing import pattern_sequences
from teleflm.tune.report import write_results
from teleflm.tune.runs import to_toml
from teleflm.tune.search import load_space, planned_trials, search
from teleflm.tune.transfer import transfer
from tests.tune.common import proxy_config

REPO = Path(__file__).resolve().parents[2]


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


def quiet(_):
    pass


def study_trials(out: Path):
    import optuna

    return optuna.load_study(
        storage=f"sqlite:///{(out / 'study.db').resolve()}", study_name="teleflm-search"
    ).trials


def test_search_records_every_trial_once_and_resumes_without_redoing(setup):
    space = load_space(setup / "space.toml")
    raw = tomllib.loads((setup / "proxy.toml").read_text())
    out = setup / "search"
    first = search(raw, space, out, str(setup / "seqs.npy"), log=quiet)
    assert [r["trial"] for r in first] == list(range(4))
    assert [r["values"] for r in first] == planned_trials(space)
    messages = []
    again = search(raw, space, out, str(setup / "seqs.npy"), log=messages.append)
    assert "4 trials finished so far" in messages[0] and len(messages) == 1  # nothing ran again
    assert again == first and len(study_trials(out)) == 4
    best = write_results(raw, again, out, "proxy.toml")
    assert best["objective"] == min(r["objective"] for r in again)
    assert tomllib.loads((out / "best.toml").read_text())["mup"]["lr"] == best["mup"]["lr"]
    assert (out / "search.md").exists() and (out / "search.png").exists() and (out / "trials.csv").exists()

    # Another space against the same study is refused, not mixed in.
    other = load_space(setup / "space.toml")
    other.params["lr"].values = [1e-3, 3e-2]
    with pytest.raises(ValueError, match="holds another search"):
        search(raw, other, out, str(setup / "seqs.npy"), log=quiet)


def test_two_workers_share_one_study(setup):
    """Two worker processes (one thread each) on one SQLite study: every planned trial runs exactly
    once, and the search finds what one worker finds."""
    space = load_space(setup / "space.toml")
    raw = tomllib.loads((setup / "proxy.toml").read_text())
    one = search(raw, space, setup / "one", str(setup / "seqs.npy"), log=quiet)
    space.parallel = 2
    two = search(raw, space, setup / "two", str(setup / "seqs.npy"), log=quiet)
    trials = study_trials(setup / "two")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs["plan_index"] for t in complete) == [0, 1, 2, 3]  # none twice
    assert len({t.system_attrs["teleflm_worker"]["pid"] for t in complete}) == 2  # both worked
    assert [r["values"] for r in two] == [r["values"] for r in one]
    assert [r["objective"] for r in two] == pytest.approx([r["objective"] for r in one], rel=1e-4)
    assert min(two, key=lambda r: r["objective"])["trial"] == min(one, key=lambda r: r["objective"])["trial"]


def test_a_queued_trial_is_claimed_once_when_two_workers_race_for_it(setup, monkeypatch):
    """Optuna claims a queued trial by reading its state and then writing RUNNING. Two workers (two
    connections to one SQLite study) interleaved at the worst point, worker A paused between its read
    and its write while worker B claims the same trial: exactly one of them gets it. (SQLite ignores
    SELECT ... FOR UPDATE, so without serialized transactions both did: 2 workers ran trial 0.)"""
    import threading

    import optuna
    from optuna.storages._rdb import models

    import teleflm.tune.search as search_module

    monkeypatch.setattr(search_module, "SQLITE_BUSY_TIMEOUT_S", 0.5)  # B gives up waiting for A's lock
    space = load_space(setup / "space.toml")
    url = f"sqlite:///{(setup / 'study.db').resolve()}"
    worker_a, worker_b = (search_module.open_study(url, "race", space)._storage for _ in range(2))
    trial_id = worker_a.get_all_trials(worker_a.get_study_id_from_name("race"))[0]._trial_id
    a_has_read, b_has_tried = threading.Event(), threading.Event()
    read = models.TrialModel.find_or_raise_by_id

    def read_then_wait_for_b(*args, **kwargs):
        trial = read(*args, **kwargs)
        if threading.current_thread().name == "worker-a":
            a_has_read.set()
            assert b_has_tried.wait(30)
        return trial

    monkeypatch.setattr(models.TrialModel, "find_or_raise_by_id", read_then_wait_for_b)
    claimed = {}

    def claim_as(name, storage):
        try:
            claimed[name] = storage.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING)
        except optuna.exceptions.StorageInternalError:  # the database was locked: A holds the claim
            claimed[name] = False

    a = threading.Thread(target=claim_as, args=("a", worker_a), name="worker-a")
    a.start()
    assert a_has_read.wait(30)
    claim_as("b", worker_b)
    b_has_tried.set()
    a.join()
    assert claimed == {"a": True, "b": False}


# A worker process that SIGKILLs itself when it starts its second trial (after claiming it): a worker
# dead mid-trial, at that point whatever the timing.
KILL_IN_SECOND_TRIAL = """
import os, signal, sys
import teleflm.tune.search as search

real, calls = search.scored_run, []

def die_in_second(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

search.scored_run = die_in_second
from teleflm.cli.main import main
main(sys.argv[1:])
"""


def test_a_worker_killed_mid_trial_is_taken_over(setup):
    out = setup / "search"
    args = ["mup", "search", "--config", str(setup / "proxy.toml"), "--space", str(setup / "space.toml")]
    args += ["--out", str(out), "--sequences", str(setup / "seqs.npy"), "--parallel", "1"]
    proc = subprocess.run(
        [sys.executable, "-c", KILL_IN_SECOND_TRIAL, *args], cwd=REPO, stdout=subprocess.DEVNULL, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL
    states = [t.state.name for t in study_trials(out)]
    assert states == ["COMPLETE", "RUNNING", "WAITING", "WAITING"]  # trial 1 held by a dead worker
    assert main(args) == 0  # another worker: it fails the dead one's trial, queues it again, runs all
    trials = study_trials(out)
    complete = sorted(t.user_attrs["plan_index"] for t in trials if t.state.name == "COMPLETE")
    assert complete == [0, 1, 2, 3]
    assert [t.user_attrs["plan_index"] for t in trials if t.state.name == "FAIL"] == [1]
    assert (out / "best.toml").exists()


def test_tpe_runs_its_trials(setup):
    (setup / "tpe.toml").write_text(
        'method = "tpe"\ntrials = 3\nseed = 1\n[params.lr]\nlow = 1e-3\nhigh = 1e-1\n[derived]\nmatrix_lr = "lr"\n'
        'min_lr = "0.1 * lr"\n'
    )
    raw = tomllib.loads((setup / "proxy.toml").read_text())
    records = search(raw, load_space(setup / "tpe.toml"), setup / "tpe", str(setup / "seqs.npy"), log=quiet)
    assert len(records) == 3 and all(1e-3 <= r["values"]["lr"] <= 1e-1 for r in records)
    assert all(r["values"]["matrix_lr"] == r["values"]["lr"] for r in records)


def test_transfer_keeps_values_and_sets_the_width_multiplier(setup, tmp_path):
    best = {
        "proxy_width": 32.0,
        "proxy_depth": 1.0,
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
    assert written["model"]["mup_depth_factor"] == 1.0  # same depth as the proxy: no branch multiplier
    deep = copy.deepcopy(big)
    deep["model"]["num_hidden_layers"] = 8
    (tmp_path / "deep.toml").write_text(to_toml(deep))
    args = ["mup", "transfer", "--best", str(tmp_path / "best.toml"), "--to", str(tmp_path / "deep.toml")]
    assert main(args) == 0
    written = tomllib.loads((tmp_path / "deep-mup.toml").read_text())
    assert written["model"]["mup_depth_factor"] == 8.0 and written["mup"] == best["mup"]
    assert "each residual branch is multiplied by 0.125" in (tmp_path / "deep-mup.md").read_text()
    big["model"]["use_mup"] = False
    with pytest.raises(ValueError, match="use_mup = false"):
        transfer(best, big)


def test_held_out_loss_gives_padded_ids_no_mass():
    import torch
    import torch.nn.functional as F

    from teleflm.model import TeleFLMForCausalLM
    from teleflm.testing import tiny_config
    from teleflm.tune.runs import heldout_loss

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
