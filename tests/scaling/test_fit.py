"""L(N) = a*N^b + c: recovered from noisy synthetic ladders; bad ladders refused with clear messages."""

import numpy as np
import pytest

from teleflm.scaling.fit import FitError, PowerLaw, fit_power_law, predict

TRUE = PowerLaw(a=60.0, b=-0.3, c=2.0)


def noisy_ladder(rungs=6, noise=0.002, seed=0):
    sizes = np.geomspace(1e5, 1e8, rungs)
    rng = np.random.default_rng(seed)
    return sizes, TRUE(sizes) * (1 + noise * rng.standard_normal(rungs))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_known_law_from_noisy_points(seed):
    sizes, losses = noisy_ladder(seed=seed)
    law = fit_power_law(sizes, losses)
    assert law.b == pytest.approx(TRUE.b, abs=0.05)
    assert law.c == pytest.approx(TRUE.c, abs=0.15)
    assert law(1e9) == pytest.approx(TRUE(1e9), rel=0.01)  # a 10x extrapolation


def test_exact_points_give_the_exact_law():
    sizes = np.geomspace(1e6, 1e8, 4)
    law = fit_power_law(sizes, TRUE(sizes))
    assert (law.a, law.b, law.c) == pytest.approx((TRUE.a, TRUE.b, TRUE.c), rel=1e-3)


def test_bootstrap_interval_brackets_the_truth():
    sizes, losses = noisy_ladder(rungs=5, noise=0.003)
    p = predict(sizes, losses, 1e9)
    assert p.low <= p.loss <= p.high and p.bootstrap_fits > 50
    assert p.low - 0.01 <= TRUE(1e9) <= p.high + 0.01


def test_the_interval_measures_the_scatter_of_the_ladder():
    """Its width follows the rungs' noise (resampling rungs gave zero width with 3 of them)."""
    widths = []
    for noise in (0.001, 0.004):
        sizes, losses = noisy_ladder(rungs=6, noise=noise, seed=3)
        p = predict(sizes, losses, 1e9)
        widths.append(p.high - p.low)
    assert 0 < widths[0] < widths[1] / 2


def test_three_rungs_give_no_interval():
    """Three rungs fit three parameters exactly: nothing is left to measure the uncertainty by."""
    sizes, losses = noisy_ladder(rungs=3, noise=0.003)
    p = predict(sizes, losses, 1e9)
    assert not p.has_interval and p.low is None and p.high is None and p.bootstrap_fits == 0
    assert p.loss == pytest.approx(fit_power_law(sizes, losses)(1e9))


def test_fewer_than_three_points_refused():
    with pytest.raises(FitError, match="give at least 3 rungs"):
        fit_power_law([1e6, 1e7], [3.0, 2.8])


def test_non_monotonic_sizes_refused():
    with pytest.raises(FitError, match="strictly increase"):
        fit_power_law([1e6, 1e8, 1e7], [3.0, 2.6, 2.8])


def test_loss_not_falling_refused():
    with pytest.raises(FitError, match="does not fall with size"):
        fit_power_law([1e6, 1e7, 1e8], [3.0, 3.1, 3.2])


def test_fit_that_does_not_converge_is_a_clear_error(monkeypatch):
    import scipy.optimize

    def no_convergence(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found: Number of calls to function has reached maxfev")

    monkeypatch.setattr(scipy.optimize, "curve_fit", no_convergence)
    sizes, losses = noisy_ladder()
    with pytest.raises(FitError, match="did not converge"):
        fit_power_law(sizes, losses)
