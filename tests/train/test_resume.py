"""Exact resume: a run killed with SIGKILL and started again with the same command continues exactly
as an uninterrupted run; a checkpoint cut short mid-write is ignored."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train.common import logged_losses

RUN = Path(__file__).with_name("run_tiny.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def command(out: Path, ranks: int, sections: dict) -> list[str]:
    args = [str(RUN), str(out), json.dumps(sections)]
    if ranks == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *args]


def run(out: Path, ranks: int = 1, **sections) -> None:
    subprocess.run(command(out, ranks, sections), check=True, env=ENV, capture_output=True, timeout=600)


def run_and_kill_after_checkpoint(out: Path, ranks: int = 1, **sections) -> None:
    """Start the run, SIGKILL the whole process group once the step-5 checkpoint is complete."""
    proc = subprocess.Popen(
        command(out, ranks, sections),
        env=ENV,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    marker = out / "checkpoints" / "step-00000005" / "trainer.json"
    deadline = time.time() + 300
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before its checkpoint: {proc.stderr.read().decode()[-3000:]}")
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


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
