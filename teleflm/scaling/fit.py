"""muScaling loss prediction (SPEC section 3): fit L(N) = a * N^b + c to a ladder of muP widths and
extrapolate, with a residual bootstrap for the uncertainty when the ladder has more rungs than the
law has parameters."""

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


def fit_power_law(sizes, losses) -> PowerLaw:
    """Least-squares fit of L = a*N^b + c with a > 0, b < 0, 0 <= c < min(L).

    For each c on a grid below min(L), log(L - c) is linear in log N, which gives a and b in closed
    form; the best of these starts scipy's bounded curve_fit (sizes scaled by the smallest)."""
    from scipy.optimize import curve_fit

    sizes, losses = check_ladder(sizes, losses)
    if not losses[-1] < losses[0]:
        raise FitError(
            f"ladder: the loss does not fall with size ({losses[0]:.4g} at the smallest rung, "
            f"{losses[-1]:.4g} at the largest): no power law to fit; train longer or check the runs"
        )
    n0 = sizes[0]
    x = sizes / n0
    best = None
    for c in np.linspace(0.0, losses.min(), 200, endpoint=False):
        slope, intercept = np.polyfit(np.log(x), np.log(losses - c), 1)
        pred = np.exp(intercept) * x**slope + c
        sse = float(np.sum((pred - losses) ** 2))
        if slope < 0 and (best is None or sse < best[0]):
            best = (sse, np.exp(intercept), slope, c)
    if best is None:
        raise FitError("ladder: no decreasing power law fits these losses")
    p0 = [best[1], best[2], best[3]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OptimizeWarning on exact fits (3 points): covariance unused
        try:
            (a, b, c), _ = curve_fit(
                lambda n, a, b, c: a * n**b + c,
                x,
                losses,
                p0=p0,
                bounds=([0.0, -5.0, 0.0], [np.inf, 0.0, losses.min()]),
                maxfev=20000,
            )
        except (RuntimeError, ValueError) as e:
            raise FitError(f"ladder: the fit of L = a*N^b + c did not converge ({e})") from None
    if not all(map(math.isfinite, (a, b, c))) or b >= 0:
        raise FitError(
            f"ladder: the fit did not converge to a decreasing law (a={a:.3g}, b={b:.3g}, c={c:.3g})"
        )
    return PowerLaw(a=float(a) * n0 ** -float(b), b=float(b), c=float(c))


@dataclass
class Prediction:
    size: float
    loss: float
    low: float | None  # residual-bootstrap percentile interval; None with 3 rungs (no residuals)
    high: float | None
    law: PowerLaw
    bootstrap_fits: int

    @property
    def has_interval(self) -> bool:
        return self.low is not None


def predict(
    sizes, losses, target_size: float, samples: int = 200, level: float = 0.9, seed: int = 0
) -> Prediction:
    """The fitted loss at `target_size`, with a residual-bootstrap interval: the law refitted to its
    own curve plus the fit's residuals drawn with replacement (scaled by sqrt(n / (n - 3)) for the
    three fitted parameters), the interval the `level` percentiles of the refits' predictions.

    Three rungs fit the three-parameter law exactly and leave no residual: no interval then (low and
    high are None). Resampling the rungs instead, as before, keeps only the resamples holding all
    three, which give the same fit: a 90% interval of zero width."""
    sizes, losses = check_ladder(sizes, losses)
    law = fit_power_law(sizes, losses)
    point = float(law(target_size))
    n = len(sizes)
    if n <= 3:
        return Prediction(target_size, point, None, None, law, 0)
    fitted = law(sizes)
    residuals = (losses - fitted) * math.sqrt(n / (n - 3))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        try:
            values.append(float(fit_power_law(sizes, fitted + rng.choice(residuals, n))(target_size)))
        except FitError:  # a resample whose loss no longer falls with size
            continue
    if not values:
        return Prediction(target_size, point, None, None, law, 0)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Prediction(target_size, point, float(min(low, point)), float(max(high, point)), law, len(values))
