"""`teleflm dpo` end to end: a tiny base model learns to prefer the task's answer format on held-out
pairs; dp2 and tp2 give one process's losses; a resumed run keeps its reference."""

import json

import pytest

from teleflm.cli.main import main
from tests.sft.common import SYSTEM, pretrain_base, task, word_pairs


def preference_line(color: str, animal: str) -> dict:
    """The task's answer against the same words in the wrong slots."""
    user, answer = task(color, animal)
    return {
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        "chosen": answer,
        "rejected": f"A {color} that is {animal}.",
    }


def dpo_toml(root, init, out, extra: str = "") -> str:
    pairs = root / "pairs.jsonl"
    train, held_out = word_pairs()
    pairs.write_text("".join(json.dumps(preference_line(c, a)) + "\n" for c, a in train + held_out))
    path = root / "dpo.toml"
    path.write_text(
        f"""out = "{out}"
seed = 0

[dpo]
init = "{init}"
data = ["{pairs}"]
epochs = 12.0
beta = 0.1
heldout_fraction = 0.25
{extra}

[mup]
lr = 3e-3
matrix_lr = 3e-3
min_lr = 3e-4

[data]
context_length = 64

[batch]
global_batch_tokens = {64 * 16}
micro_batch_size = 8

[schedule]
warmup_steps = 3

[parallel]
mixed_precision = "fp32"

[checkpoint]
interval_steps = 20

[logging]
progress_bar = false
"""
    )
    return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory, chat_tokenizer_dir):
    return pretrain_base(tmp_path_factory.mktemp("dpo-base") / "base", chat_tokenizer_dir)


def test_tuned_model_prefers_the_chosen_answers_it_never_saw(base, tmp_path):
    assert main(["dpo", "--config", dpo_toml(tmp_path, base, tmp_path / "run")]) == 0
    figures = json.loads((tmp_path / "run" / "dpo_eval.json").read_text())
    before, after = figures["before"], figures["after"]
    print(figures)
    assert before["pairs"] == after["pairs"] == 16 and before["reward_margin"] == 0
    assert after["reward_margin"] > 1.0 and after["reward_accuracy"] >= 0.9
    assert after["prefers_chosen"] > before["prefers_chosen"] + 0.2  # the starting model's own preference
    report = json.loads((tmp_path / "run" / "dpo_data.json").read_text())
    assert report["train"] == 48 and report["heldout"] == 16 and report["skipped_lines"] == []
    assert (tmp_path / "run" / "export" / "config.json").is_file()


def _dpo_losses(config: str, overrides: list[str]) -> dict[int, float]:
    from teleflm.sft.config import load_sft_config
    from teleflm.sft.dpo import run_dpo
    from teleflm.testing import logged_losses

    cfg = load_sft_config(config, overrides, table="dpo")
    run_dpo(cfg, log=lambda _: None)
    return logged_losses(cfg.train.out)


@pytest.mark.parametrize(
    "layout",
    [["parallel.dp_shard=2", "batch.micro_batch_size=4"], ["parallel.tp=2", "parallel.dp_shard=1"]],
    ids=["dp2", "tp2"],
)
def test_dpo_under_dp2_and_tp2_matches_one_process(base, tmp_path, layout):
    """The pairs split over ranks (reference log-probabilities too) and the loss is normalised over the
    pairs of the global batch: 4 steps' losses equal one process's."""
    from teleflm.testing import run_ranks

    config = dpo_toml(tmp_path, base, tmp_path / "one")
    short = [f"schedule.total_tokens={64 * 16 * 4}", "checkpoint.export_at_end=false"]
    reference = _dpo_losses(config, short)
    losses = run_ranks(2, _dpo_losses, config, [*short, *layout, f"out='{tmp_path / 'two'}'"])[0]
    assert sorted(reference) == sorted(losses) == [1, 2, 3, 4]
    assert reference[1] == pytest.approx(0.6931, abs=1e-3)  # the policy starts as its reference: log 2
    for step in reference:
        assert losses[step] == pytest.approx(reference[step], rel=1e-4), (step, losses, reference)


class Stop(Exception):
    pass


def test_resumed_run_keeps_its_reference_and_its_losses(base, tmp_path, monkeypatch):
    """A run stopped right after its step-20 checkpoint and started again equals one uninterrupted
    run: the reference is read back (the weights have moved since), the pairs go on where they
    stopped."""
    from teleflm.train.trainer import Trainer

    straight = _dpo_losses(dpo_toml(tmp_path, base, tmp_path / "straight"), [])
    save = Trainer.save_checkpoint

    def save_then_stop(self):
        path = save(self)
        if self.step == 20:
            raise Stop
        return path

    config = dpo_toml(tmp_path, base, tmp_path / "resumed")
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save_checkpoint", save_then_stop)
        with pytest.raises(Stop):
            _dpo_losses(config, [])
    reference = (tmp_path / "resumed" / "dpo_reference.npz").read_bytes()
    resumed = _dpo_losses(config, [])
    assert (tmp_path / "resumed" / "dpo_reference.npz").read_bytes() == reference
    assert sorted(resumed) == sorted(straight) and len(straight) == 72
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6), step
