"""What a run does before its first step, at any scale: a process group that fails instead of hanging,
and a data budget checked against every domain's epochs."""

import pytest
import torch.distributed as dist

from teleflm.data.synthetic import ArrayStream, write_synthetic_shards
from teleflm.testing import pattern_sequences, run_ranks, tiny_train_config
from teleflm.train.trainer import Trainer


def _timeout_of_the_group_the_trainer_made(out: str) -> float:
    assert not dist.is_initialized()  # torchrun's environment only: the trainer makes the group
    cfg = tiny_train_config(out, parallel={"dp_shard": 2, "timeout_s": 77})
    trainer = Trainer(cfg, stream_factory=lambda r, n: ArrayStream(pattern_sequences(), r, n))
    backend = dist.distributed_c10d._get_default_group()._get_backend(trainer.device)
    return backend.options._timeout.total_seconds()


def test_the_process_group_has_the_configured_timeout(tmp_path):
    assert run_ranks(2, _timeout_of_the_group_the_trainer_made, str(tmp_path), init=False) == [77.0, 77.0]


def test_a_budget_past_a_domains_epochs_is_refused_before_any_work(tmp_path):
    """Ten steps of 8 x 32 tokens from a domain of about 1,000 tokens allowed one epoch: refused at
    construction, not warned about weeks in; allowed with a warning when the config says so."""
    shards = write_synthetic_shards(tmp_path / "shards", {"small": 100}, mean_tokens=10, vocab_size=96)
    mixture = [{"name": "small", "proportion": 1.0, "epochs": 1.0}]
    cfg = tiny_train_config(tmp_path / "run", data={"shards": str(shards.root), "mixture": mixture})
    with pytest.raises(ValueError, match=r"'small' needs \d+\.?\d* epochs .* allowed 1"):
        Trainer(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    cfg.data.repeat_past_epochs = True
    with pytest.warns(UserWarning, match="'small' needs"):
        Trainer(cfg)
