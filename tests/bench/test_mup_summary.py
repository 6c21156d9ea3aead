"""bench_mup's sub-grid optimum: the vertex of a parabola in log(lr), or the grid's best point where
there is no parabola to fit."""

import math

import pytest

from bench.bench_mup import optimum_lr

LRS = [0.025 / 2**k for k in range(8)]


@pytest.mark.parametrize("true_lr", [3e-3, 4.1e-3, 1e-2])
def test_the_vertex_of_a_loss_quadratic_in_log_lr_is_found_between_grid_points(true_lr):
    losses = [4.8 + 0.3 * math.log(lr / true_lr) ** 2 for lr in LRS]
    assert optimum_lr(LRS, losses) == pytest.approx(true_lr, rel=1e-9)


def test_an_optimum_at_the_grid_end_or_beside_a_diverged_run_is_the_grid_point():
    falling = [5.0 - 0.1 * k for k in range(8)]  # best at the smallest lr: no neighbour below it
    assert optimum_lr(LRS, falling) == LRS[-1]
    diverged = [math.nan, 4.7, 4.9, 5.0, 5.1, 5.2, 5.3, 5.4]  # best beside a diverged run
    assert optimum_lr(LRS, diverged) == LRS[1]
