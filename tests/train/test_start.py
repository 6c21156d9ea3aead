"""What a run does before its first step, at any scale: a process group that fails instead of hanging,
and a data budget checked against every domain's epochs."""

import torch.distributed as dist

from teleflm.data.synthetic import ArrayStream
from tests.distributed import run_ranks
from tests.train.common import pattern_sequences, tiny_train_config


def _timeout_of_the_group_the_trainer_made(out: str) -> float:
    from teleflm.train.trainer import Trainer

    assert not dist.is_initialized()  # torchrun's environment only: the trainer makes the group
    cfg = tiny_train_config(out, parallel={"dp_shard": 2, "timeout_s": 77})
    trainer = Trainer(cfg, stream_factory=lambda r, n: ArrayStream(pattern_sequences(), r, n))
    backend = dist.distributed_c10d._get_default_group()._get_backend(trainer.device)
    return backend.options._timeout.total_seconds()


def test_the_process_group_has_the_configured_timeout(tmp_path):
    assert run_ranks(2, _timeout_of_the_group_the_trainer_made, str(tmp_path), init=False) == [77.0, 77.0]
