"""Every parallel layout trains exactly like one process: the first 5 losses agree (rel. 1e-4)."""

import pytest

from teleflm.testing import run_ranks, train_losses

STEPS = 5


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    return train_losses(str(tmp_path_factory.mktemp("single")), {}, STEPS)


LAYOUTS = {
    "dp2": (2, {"dp_shard": 2}),
    "tp2": (2, {"tp": 2, "dp_shard": 1}),
    "pp2-1F1B": (2, {"pp": 2, "dp_shard": 1}),
    "pp2-GPipe": (2, {"pp": 2, "dp_shard": 1, "pp_schedule": "GPipe"}),
    "hsdp2x2": (4, {"dp_replicate": 2, "dp_shard": 2}),
    "dp2-pp2-tp2": (8, {"dp_shard": 2, "pp": 2, "tp": 2}),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path):
    world, parallel = LAYOUTS[layout]
    results = run_ranks(world, train_losses, str(tmp_path), parallel, STEPS)
    losses = results[0]
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], rel=1e-4), (layout, step, losses, reference)
    # The loss must actually move, or agreement would prove little.
    assert reference[STEPS] < reference[1] - 0.1
