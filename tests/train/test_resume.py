"""Exact resume: a run killed with SIGKILL and started again with the same command continues exactly
as an uninterrupted run; a checkpoint cut short mid-write is ignored."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from teleflm.cli.main import main
from teleflm.data.synthetic import ArrayStream
from teleflm.testing import logged_losses, pattern_sequences, tiny_train_config
from teleflm.train.checkpoint import CheckpointError, load_model
from teleflm.train.trainer import Trainer

RUN = Path(__file__).with_name("run_tiny.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def command(out: Path, ranks: int, sections: dict, kill_after_step: int | None = None) -> list[str]:
    args = [str(RUN), str(out), json.dumps(sections), *([str(kill_after_step)] if kill_after_step else [])]
    if ranks == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *args]


def run(out: Path, ranks: int = 1, **sections) -> None:
    subprocess.run(command(out, ranks, sections), check=True, env=ENV, capture_output=True, timeout=600)


def run_and_kill_after_checkpoint(out: Path, ranks: int = 1, **sections) -> None:
    """Run until every process SIGKILLs itself right after logging step 7, two steps past the step-5
    checkpoint and three before the run's end: the kill lands there whatever the timing."""
    killed = subprocess.run(
        command(out, ranks, sections, kill_after_step=7), env=ENV, capture_output=True, timeout=600
    )
    assert killed.returncode != 0, "the run was not killed"
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 8)), killed.stderr.decode()[-3000:]


def test_sigkill_resume_is_exact_in_one_process(tmp_path):
    run(tmp_path / "straight")
    run_and_kill_after_checkpoint(tmp_path / "killed")
    run(tmp_path / "killed")  # the same command again
    straight, resumed = logged_losses(tmp_path / "straight"), logged_losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 11))
    for step in range(6, 11):
        assert resumed[step] == straight[step], (step, resumed[step], straight[step])


@pytest.mark.slow
def test_sigkill_resume_under_dp2_and_resharded_from_4_ranks(tmp_path):
    run(tmp_path / "straight", ranks=2)
    run_and_kill_after_checkpoint(tmp_path / "killed", ranks=2)
    run(tmp_path / "killed", ranks=2)
    straight, resumed = logged_losses(tmp_path / "straight"), logged_losses(tmp_path / "killed")
    for step in range(6, 11):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-5), step

    # 4 ranks write the step-5 checkpoint and are killed; 2 ranks load it (resharded) and go on.
    four = tmp_path / "four"
    run_and_kill_after_checkpoint(four, ranks=4)
    run(four, ranks=2)
    resharded = logged_losses(four)
    for step in range(6, 11):
        assert resharded[step] == pytest.approx(straight[step], rel=1e-4), step


def test_checkpoint_cut_short_is_ignored(tmp_path):
    out = tmp_path / "run"
    run(out)
    ckpts = out / "checkpoints"
    # Step 10's checkpoint loses its metadata (a crash mid-write); a .tmp folder lies beside it.
    (ckpts / "step-00000010" / ".metadata").unlink()
    shutil.copytree(ckpts / "step-00000005", ckpts / "step-00000015.tmp")
    from teleflm.train.checkpoint import latest_checkpoint

    with pytest.warns(UserWarning, match="incomplete"):
        assert latest_checkpoint(ckpts) == ckpts / "step-00000005"
    before = logged_losses(out)
    run(out)  # resumes from step 5, redoes 6..10 identically
    after = logged_losses(out)
    assert after == before
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert [e["checkpoint"] for e in resumed] == [str(ckpts / "step-00000005")]
    # The next save removes what was cut short (full-size folders otherwise kept forever).
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000005", "step-00000010"]


def train(out: Path, **sections) -> Trainer:
    """The tiny run in this process (10 steps, checkpoints at 5 and 10); returns its trainer."""
    sequences = pattern_sequences()
    trainer = Trainer(tiny_train_config(out, **sections), lambda r, n: ArrayStream(sequences, r, n))
    trainer.run()
    return trainer


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damaged", ["__0_0.distcp", "trainer.json"])
def test_damaged_newest_checkpoint_is_named_set_aside_and_resume_falls_back(tmp_path, damaged, capsys):
    out = tmp_path / "run"
    train(out)
    before = logged_losses(out)
    ckpts = out / "checkpoints"
    newest = ckpts / "step-00000010"
    cut_in_half(newest / damaged)
    cut = (newest / damaged).stat().st_size
    with pytest.raises(CheckpointError, match=re.escape(str(newest / damaged))):
        load_model(newest)
    export = ["export", "--checkpoint", str(newest), "--out", str(tmp_path / "hf")]
    assert main(export) == 2
    assert str(newest / damaged) in capsys.readouterr().err

    with pytest.warns(UserWarning, match=rf"{re.escape(damaged)}.*resuming from .*step-00000005"):
        train(out)
    assert logged_losses(out) == before  # steps 6..10 redone from step 5, exactly
    kept = ckpts / "step-00000010.unloadable"
    assert (kept / damaged).stat().st_size == cut  # kept as it was, for inspection
    assert load_model(newest)[1]["step"] == 10  # written again by the resumed run
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["set_aside_as"] for e in events if e["event"] == "unloadable_checkpoint"] == [str(kept)]


def test_no_loadable_checkpoint_stops_and_moves_nothing(tmp_path):
    out = tmp_path / "run"
    train(out)
    ckpts = out / "checkpoints"
    for step in (5, 10):
        cut_in_half(ckpts / f"step-{step:08d}" / "__0_0.distcp")
    with pytest.raises(CheckpointError, match="step-00000010.*step-00000005.*no checkpoint loads"):
        train(out)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000005", "step-00000010"]


def test_checkpoint_of_another_shape_is_a_config_error_not_a_fallback(tmp_path):
    out = tmp_path / "run"
    train(out)
    with pytest.raises(ValueError, match=r"another model shape: hidden_size 64 \(config: 128\)"):
        train(out, model={"hidden_size": 128, "intermediate_size": 256})
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]


def test_resumed_run_keeps_one_history(tmp_path):
    """Steps 6 and 7 of the killed attempt are redone: metrics.jsonl and TensorBoard show them once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    killed = subprocess.run(command(out, 1, {}, kill_after_step=7), env=ENV, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [
        *range(1, 8)
    ]
    run(out)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    assert [s.step for s in board.Scalars("loss")] == list(range(1, 11))
