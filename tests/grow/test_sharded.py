"""Growth sharded over 4 gloo ranks (FSDP), from a checkpoint saved by 4 ranks: the grown checkpoint
equals one process's growth exactly, weights and AdamW state, and equals the in-memory operators on
the whole tensors; no rank holds more than its quarter of the grown model."""

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from teleflm import mup
from teleflm.data.synthetic import ArrayStream
from teleflm.grow.operators import grow_adam_state, grow_weights
from teleflm.grow.plan import SHAPE_FIELDS
from teleflm.testing import pattern_sequences, run_ranks, tiny_train_config
from tests.grow.common import WIDTH_X2_DEPTH_X2

TARGET = {**WIDTH_X2_DEPTH_X2, "mup_scale_factor": 4.0}


def train_source(out: str) -> None:
    from teleflm.train.trainer import Trainer

    cfg = tiny_train_config(Path(out), parallel={"dp_shard": 4}, schedule={"total_tokens": 8 * 32 * 3})
    Trainer(cfg, stream_factory=lambda rank, size: ArrayStream(pattern_sequences(), rank, size)).run()


def grown_config(out: Path):
    base = tiny_train_config(out)
    return tiny_train_config(out, model={**base.model, **TARGET})


def grow(source: str, target: str) -> dict[str, int]:
    from teleflm.train.growth import grow_checkpoint

    return grow_checkpoint(Path(source), Path(target), grown_config(Path(target).parent), 5, seed=7)[2]


def read_whole(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, whole, in one process."""
    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    flat = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }
    dcp.load(flat, checkpoint_id=str(path), no_dist=True)
    return flat


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    run_ranks(4, train_source, str(root / "run"))
    source = root / "run" / "checkpoints" / "step-00000003"
    sharded = run_ranks(4, grow, str(source), str(root / "four"))
    whole = grow(str(source), str(root / "one"))
    return source, root, sharded, whole


def test_four_ranks_grow_what_one_process_grows_exactly(grown):
    _, root, _, _ = grown
    four, one = read_whole(root / "four"), read_whole(root / "one")
    assert sorted(four) == sorted(one) and any(k.startswith("optim.state.") for k in one)
    for key in one:
        assert torch.equal(four[key], one[key]), key


def test_the_grown_checkpoint_is_the_in_memory_growth_of_the_whole_tensors(grown):
    from teleflm.train.growth import plan_for_checkpoint

    source, root, _, _ = grown
    cfg = grown_config(root)
    config, plan = plan_for_checkpoint(source, cfg.model)
    old, one = read_whole(source), read_whole(root / "one")
    weights = grow_weights(
        {k.removeprefix("model."): v for k, v in old.items() if k.startswith("model.")},
        plan,
        config,
        cfg.mup,
        7,
    )
    for name, value in weights.items():
        assert torch.equal(one[f"model.{name}"], value), name
    old_config = tiny_train_config(root).model_config()
    moments = grow_adam_state(
        {k.removeprefix("optim."): v for k, v in old.items() if k.startswith("optim.state.")},
        plan,
        config,
        mup.width_mult(old_config),
        mup.width_mult(config),
    )
    for key, value in moments.items():
        assert torch.equal(one[f"optim.{key}"], value), key
    assert {f: getattr(config, f) for f in SHAPE_FIELDS} == {f: TARGET[f] for f in SHAPE_FIELDS}


def test_no_rank_holds_the_whole_model(grown):
    _, _, sharded, whole = grown
    total = whole["local"]  # one process holds every weight
    assert sum(r["local"] for r in sharded) == total
    for counts in sharded:
        assert counts["local"] <= total / 4 + 1024  # its FSDP quarter (rows split unevenly)
        assert counts["read"] <= 3 * counts["local"] + 1024  # old weights and moments landing in it
        assert counts["drawn"] < total / 8  # the fresh rows of one parameter's shard at a time


def test_plan_simulate_counts_what_the_real_sharded_growth_read(grown):
    """`teleflm plan --simulate`'s growth figures, on a fake world of 4, against the real growth's
    counts on each of the 4 gloo ranks."""
    from teleflm.plan.simulate import simulate_growth
    from teleflm.train.config import GrowthStage

    source, root, sharded, _ = grown
    old_params = [
        k for k in FileSystemReader(str(source)).read_metadata().state_dict_metadata if k.startswith("model.")
    ]
    new_cfg = grown_config(root)
    for rank, real in enumerate(sharded):
        simulated = simulate_growth(
            tiny_train_config(root), new_cfg, GrowthStage(model=new_cfg.model), 4, rank
        )
        assert simulated["old_parts"] == 4 * (real["read"] - len(old_params))  # less the step counts
        assert simulated["fresh_rows"] == 4 * real["drawn"]
