"""muScaling loss prediction (docs/mup.md): fit L(N) = a * N^b + c to a ladder of muP widths (each
rung's loss the mean over its seeds) and extrapolate, with an interval from the seeds' scatter."""

import math
import warnings
from dataclasses import dataclass

import numpy as np


class FitError(ValueError):
    """The ladder cannot be fitted (too few points, bad sizes, no convergence): a user-facing message."""


@dataclass
class PowerLaw:
    a: float
    b: float  # negative: loss falls with size
    c: float  # irreducible loss

    def __call__(self, n):
        return self.a * np.power(np.asarray(n, dtype=float), self.b) + self.c


def check_ladder(sizes, losses) -> tuple[np.ndarray, np.ndarray]:
    sizes, losses = np.asarray(sizes, dtype=float), np.asarray(losses, dtype=float)
    if sizes.shape != losses.shape or sizes.ndim != 1:
        raise FitError(f"ladder: {sizes.size} sizes but {losses.size} losses")
    if len(sizes) < 3:
        raise FitError(
            f"ladder: {len(sizes)} point(s); L(N) = a*N^b + c has three parameters, give at least 3 rungs"
        )
    if not np.all(np.isfinite(losses)) or not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        raise FitError(
            f"ladder: sizes must be positive and losses finite, got sizes {sizes}, losses {losses}"
        )
    if np.any(np.diff(sizes) <= 0):
        raise FitError(f"ladder: sizes must strictly increase rung by rung, got {sizes.astype(int).tolist()}")
    return sizes, losses


def fit_power_law(sizes, losses, start: "PowerLaw | None" = None) -> PowerLaw:
    """Least-squares fit of L = a*N^b + c with a > 0, b < 0, 0 <= c < min(L).

    For each c on a grid below min(L), log(L - c) is linear in log N, which gives a and b in closed
    form; the best of these starts scipy's bounded curve_fit (sizes scaled by the smallest). `start`
    (a fit of nearby losses, as in the interval's refits) skips the scan."""
    sizes, losses = check_ladder(sizes, losses)
    if not losses[-1] < losses[0]:
        raise FitError(
            f"ladder: the loss does not fall with size ({losses[0]:.4g} at the smallest rung, "
            f"{losses[-1]:.4g} at the largest): no power law to fit; train longer or check the runs"
        )
    n0 = sizes[0]
    x = sizes / n0
    if start is not None:
        p0 = [start.a * n0**start.b, start.b, min(start.c, 0.999 * losses.min())]
    else:  # the scan over c: one least-squares line of log(L - c) on log x per c, all at once
        cs = np.linspace(0.0, losses.min(), 200, endpoint=False)
        lx, ly = np.log(x), np.log(losses[None, :] - cs[:, None])
        slopes = ((lx - lx.mean()) * (ly - ly.mean(axis=1, keepdims=True))).sum(axis=1) / (
            (lx - lx.mean()) ** 2
        ).sum()
        intercepts = ly.mean(axis=1) - slopes * lx.mean()
        sse = ((np.exp(intercepts[:, None]) * x[None, :] ** slopes[:, None] + cs[:, None] - losses) ** 2).sum(
            1
        )
        sse[slopes >= 0] = np.inf
        if not np.isfinite(sse).any():
            raise FitError("ladder: no decreasing power law fits these losses")
        i = int(np.argmin(sse))
        p0 = [np.exp(intercepts[i]), slopes[i], cs[i]]
    a, b, c = _least_squares(x, losses, p0, bounded=start is None)
    if not all(map(math.isfinite, (a, b, c))) or b >= 0:
        raise FitError(
            f"ladder: the fit did not converge to a decreasing law (a={a:.3g}, b={b:.3g}, c={c:.3g})"
        )
    return PowerLaw(a=float(a) * n0 ** -float(b), b=float(b), c=float(c))


def _least_squares(x, losses, p0, bounded: bool) -> tuple[float, float, float]:
    """scipy's curve_fit of a*x^b + c within a > 0, -5 <= b <= 0, 0 <= c <= min L. Started near the
    answer (`bounded` False: a refit), the unbounded Levenberg-Marquardt fit is tried first, ten times
    faster, and kept when it lands inside the bounds."""
    from scipy.optimize import curve_fit

    def law(n, a, b, c):
        return a * n**b + c

    def jacobian(n, a, b, c):
        nb = n**b
        return np.stack([nb, a * nb * np.log(n), np.ones_like(n)], axis=1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OptimizeWarning on exact fits (3 points): covariance unused
        try:
            if not bounded:
                (a, b, c), _ = curve_fit(law, x, losses, p0=p0, jac=jacobian, maxfev=2000)
                if a > 0 and -5 <= b < 0 and 0 <= c < losses.min():
                    return a, b, c
            (a, b, c), _ = curve_fit(
                law,
                x,
                losses,
                p0=p0,
                jac=jacobian,
                bounds=([0.0, -5.0, 0.0], [np.inf, 0.0, losses.min()]),
                maxfev=20000,
            )
        except (RuntimeError, ValueError) as e:
            raise FitError(f"ladder: the fit of L = a*N^b + c did not converge ({e})") from None
    return a, b, c


def seed_scatter(seed_losses) -> tuple[float, int] | None:
    """The seeds' relative standard deviation, pooled over the rungs that have two seeds or more,
    and its degrees of freedom; None when no rung has two."""
    squares, dof = 0.0, 0
    for losses in seed_losses:
        losses = np.asarray(losses, dtype=float)
        if len(losses) >= 2:
            relative = losses / losses.mean()
            squares += float(np.sum((relative - relative.mean()) ** 2))
            dof += len(losses) - 1
    return (math.sqrt(squares / dof), dof) if dof else None


@dataclass
class Prediction:
    size: float
    loss: float
    low: float | None  # the interval (see predict); None without seed scatter to draw from
    high: float | None
    law: PowerLaw
    refits: int
    seed_std: float | None = None  # the seeds' pooled relative standard deviation
    runs: int = 1  # the interval is for the mean of this many runs at `size` (0: the expected loss)

    @property
    def has_interval(self) -> bool:
        return self.low is not None


def predict(
    sizes,
    seed_losses,
    target_size: float,
    runs: int = 1,
    samples: int = 200,
    level: float = 0.9,
    seed: int = 0,
) -> Prediction:
    """The law fitted to each rung's mean over its seeds, at `target_size`, with a `level` interval
    for the mean of `runs` runs there (a single run: 1; the expected loss: 0).

    The interval comes from the seeds' scatter alone: each refit draws every rung's mean from its own
    seed noise (the pooled relative standard deviation over sqrt(seeds), the deviation itself drawn
    from its chi-square posterior, since a few seeds measure it loosely), refits the law from the
    point fit, and adds the noise of `runs` runs at the target. It is what seed-to-seed variation
    makes of the forecast, not a bound on the law itself being wrong: a held-out rung outside it
    says the law does not hold that far. With one seed per rung there is no scatter: no interval."""
    seed_losses = [np.atleast_1d(np.asarray(x, dtype=float)) for x in seed_losses]
    means = np.array([x.mean() for x in seed_losses])
    sizes, means = check_ladder(sizes, means)
    law = fit_power_law(sizes, means)
    point = float(law(target_size))
    scatter = seed_scatter(seed_losses)
    if scatter is None:
        return Prediction(target_size, point, None, None, law, 0, None, runs)
    std, dof = scatter
    counts = np.array([len(x) for x in seed_losses])
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        sigma = std * math.sqrt(dof / rng.chisquare(dof))
        drawn = means * (1 + sigma * rng.standard_normal(len(means)) / np.sqrt(counts))
        try:
            value = float(fit_power_law(sizes, drawn, start=law)(target_size))
        except FitError:  # a draw whose loss no longer falls with size
            continue
        if runs:
            value *= 1 + sigma * rng.standard_normal() / math.sqrt(runs)
        values.append(value)
    if not values:
        return Prediction(target_size, point, None, None, law, 0, std, runs)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Prediction(
        target_size, point, float(min(low, point)), float(max(high, point)), law, len(values), std, runs
    )
