"""A [[growth]] schedule in one pretrain run (pattern data, tiny config): width x2 + depth x2 at step 3,
a 4-step ramp, 10 steps in all. The loss right after growth equals the loss of the ungrown model on
that batch; the masks come off after the ramp and the export loads with transformers and matches;
a resume in the middle of the ramp is exact; dp=2 and tp=2 give one process's losses."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from teleflm.data.synthetic import ArrayStream  # noqa: E402
from teleflm.testing import logged_losses, pattern_sequences, run_ranks, tiny_train_config
from tests.grow.common import WIDTH_X2_DEPTH_X2  # noqa: E402

TOKENS_PER_STEP = 8 * 32
GROWTH = {
    "at_tokens": 3 * TOKENS_PER_STEP,
    "ramp_steps": 4,
    "model": WIDTH_X2_DEPTH_X2,
}


def run_schedule(out: str, growth: list[dict], parallel: dict | None = None, export: bool = False) -> dict:
    """The run with its growth schedule, by the stage driver; returns the last stage's figures."""
    from teleflm.config import build
    from teleflm.train import stages
    from teleflm.train.config import GrowthStage

    cfg = tiny_train_config(
        Path(out), parallel=parallel or {}, checkpoint={"interval_steps": 5, "export_at_end": export}
    )
    cfg.growth = [build(GrowthStage, g, "growth") for g in growth]
    sequences = pattern_sequences()
    return stages.run(cfg, stream_factory=lambda rank, size: ArrayStream(sequences, rank, size))


def train_losses(out: str, growth: list[dict], parallel: dict | None = None) -> dict[int, float]:
    run_schedule(out, growth, parallel)
    return logged_losses(out) if (Path(out) / "metrics.jsonl").exists() else None


@pytest.fixture(scope="module")
def grown_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grown")
    result = run_schedule(str(out), [GROWTH], export=True)
    return out, logged_losses(out), result


def test_loss_right_after_growth_equals_loss_before(grown_run, tmp_path):
    out, grown, _ = grown_run
    plain = train_losses(str(tmp_path), [])
    for step in (1, 2, 3):
        assert grown[step] == plain[step]
    # Step 4 is the grown model's first batch (masks at 0): the ungrown model's loss on it.
    assert grown[4] == pytest.approx(plain[4], abs=1e-5)
    assert grown[5] != pytest.approx(plain[5], abs=1e-4)  # then the new capacity comes in
    assert grown[10] < grown[1] - 0.1
    ckpts = out / "checkpoints"
    state = json.loads((ckpts / "step-00000003-grown" / "trainer.json").read_text())
    assert state["growth_stage"] == 1 and state["model_config"]["hidden_size"] == 128
    assert state["growth_masks"]["start_step"] == 3 and state["growth_masks"]["ramp_steps"] == 4


def test_after_the_ramp_masks_are_gone_and_the_export_matches(grown_run):
    out, _, _ = grown_run
    from transformers import AutoModelForCausalLM

    from teleflm.train.checkpoint import load_model

    final = json.loads((out / "checkpoints" / "step-00000010" / "trainer.json").read_text())
    assert final["growth_masks"] is None and final["model_config"]["num_hidden_layers"] == 4
    model, _ = load_model(out / "checkpoints" / "step-00000010")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    exported = AutoModelForCausalLM.from_pretrained(
        out / "export", trust_remote_code=True, dtype=torch.float32
    )
    ids = torch.from_numpy(pattern_sequences()[:2, :32])
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-6)
    assert exported.config.hidden_size == 128 and exported.config.mup_scale_factor == 4.0


def test_resume_in_the_middle_of_the_ramp_is_exact(grown_run, tmp_path):
    out, straight, _ = grown_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000010")
    state = json.loads((resumed / "checkpoints" / "step-00000005" / "trainer.json").read_text())
    assert state["growth_masks"]["start_step"] == 3  # step 5 is mid-ramp (m = 2/4)
    run_schedule(str(resumed), [GROWTH])
    again = logged_losses(resumed)
    for step in range(6, 11):
        assert again[step] == straight[step], step
    final = json.loads((resumed / "checkpoints" / "step-00000010" / "trainer.json").read_text())
    assert final["growth_masks"] is None  # the ramp ended


def test_a_crash_in_the_middle_of_growth_grows_again_and_trains_the_same(grown_run, tmp_path, monkeypatch):
    """The run dies with the grown shards written but not yet renamed: its restart finds the source
    checkpoint (never the `.tmp`), grows it again into the same model, and trains exactly as the run
    that never crashed; the `.tmp` does not outlive the next save."""
    import torch.distributed.checkpoint as dcp

    _, straight, _ = grown_run
    real_save = dcp.save

    def dies_after_the_grown_shards(state, checkpoint_id, **kwargs):
        real_save(state, checkpoint_id=checkpoint_id, **kwargs)
        if checkpoint_id.endswith("-grown.tmp"):
            raise RuntimeError("killed in the middle of growth")

    monkeypatch.setattr(dcp, "save", dies_after_the_grown_shards)
    with pytest.raises(RuntimeError, match="middle of growth"):
        run_schedule(str(tmp_path), [GROWTH])
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "step-00000003-grown.tmp" / ".metadata").is_file()
    assert not (ckpts / "step-00000003-grown").exists()
    monkeypatch.undo()
    run_schedule(str(tmp_path), [GROWTH])
    assert logged_losses(tmp_path) == straight
    assert not list(ckpts.glob("*.tmp"))


def test_bad_schedule_is_refused_before_training(tmp_path):
    from teleflm.config import ConfigError

    shrink = {**GROWTH, "model": {**GROWTH["model"], "intermediate_size": 64}}
    with pytest.raises(ConfigError, match=r"growth\[0\].*intermediate_size \(64\) is smaller"):
        run_schedule(str(tmp_path), [shrink])
    late = {**GROWTH, "at_tokens": 8 * TOKENS_PER_STEP}
    with pytest.raises(ConfigError, match="ramp ends at .* past schedule.total_tokens"):
        run_schedule(str(tmp_path), [late])
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        ("dp2", {"dp_shard": 2}, {}),
        ("dp2 then tp2 after growth", {"dp_shard": 2}, {"tp": 2, "dp_shard": 1}),
        ("pp2", {"pp": 2, "dp_shard": 1}, {}),
    ],
    ids=lambda layout: layout[0],
)
def test_growth_under_dp_tp_pp_matches_one_process(layout, grown_run, tmp_path):
    _, reference, _ = grown_run
    _, parallel, stage_parallel = layout
    losses = run_ranks(2, train_losses, str(tmp_path), [{**GROWTH, "parallel": stage_parallel}], parallel)[0]
    assert sorted(losses) == list(range(1, 11))
    for step in range(1, 11):
        assert losses[step] == pytest.approx(reference[step], rel=1e-4), (step, losses, reference)


def test_a_checkpoint_in_the_middle_of_a_ramp_is_not_exported(grown_run, tmp_path, capsys):
    from teleflm.cli.main import main

    out, _, _ = grown_run
    mid_ramp = out / "checkpoints" / "step-00000005"
    assert main(["export", "--checkpoint", str(mid_ramp), "--out", str(tmp_path / "hf")]) == 2
    assert "middle of a growth ramp" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
