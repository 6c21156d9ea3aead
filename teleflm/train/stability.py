"""The spike guard's verdict: is this step's loss or gradient norm out of line with the run's own recent
steps?

A loss is a spike when it exceeds the recent level (the median of the last `LEVEL_STEPS` applied
losses) by `sigma` times the run's step-to-step noise and by at least `min_loss_jump` nats. The noise
is read twice, and the larger reading counts:
- from the bulk: the differences of consecutive losses among the last `window` applied steps (a
  robust standard deviation: 1.4826 x their median absolute deviation, over sqrt 2), so a loss that
  falls fast early in a run does not read as spread, and an earlier spike does not widen it;
- from the tail: the second-highest rise over the level (above the median rise) among the last
  `window` steps judged, applied or rejected, as the deviation of Gaussian noise whose second-highest
  rise of as many would reach it. Both readings agree on Gaussian noise. Where a small batch mixes
  domains whose losses differ by nats, its loss has heavy tails that the bulk misses, and ordinary
  batches read as spikes (a 10-minute demo stopped on them). The second-highest, so one spike never
  widens the limit, but a batch met twice in a window is the run's own; the rejected steps count
  (once the next step is applied: a run of spikes that ends in a level shift is not noise), because a
  tail learned from the applied steps alone never grows past the limit it set.

The floor in nats is what keeps the guard right near zero loss: a loss settled at 0.02 that wobbles to
0.08 is a 4x ratio and many of its tiny deviations, but a 6% change in the probability of the tokens;
the spikes that wreck a run are nats high. The gradient norm is judged the same way on a log scale,
with a floor of `min_grad_ratio` times the recent level: norms differ by orders of magnitude between
runs and phases, their ratios do not. No verdict before `warmup_steps` applied steps.

A spike is a batch out of line with the model; the check comes before the update, so a step that
passes it can still leave the model worse, and then every batch after it reads as a spike. Skipping
them never recovers: after `patience` spikes in a row the guard takes the losses it rejected as the
run's new level ("level_shift", an event the trainer logs) and lets the step through.
"""

import math
from collections import deque
from statistics import NormalDist, median

LEVEL_STEPS = 5
# The width of a value's rise over the median of the LEVEL_STEPS before it, in deviations of Gaussian
# noise (2e6 simulated draws).
RISE_WIDTH = 1.134
MIN_TAIL_RISES = 10  # fewer: no tail reading (the second-highest of so few says little)


class SpikeStop(RuntimeError):
    """The stability guard stopped the run (action "stop", or more events than `max_events`)."""


def robust_noise(values: deque[float]) -> float:
    """Standard deviation of one value's noise, from the differences of consecutive values."""
    diffs = [b - a for a, b in zip(list(values)[:-1], list(values)[1:], strict=True)]
    if not diffs:
        return 0.0
    center = median(diffs)
    return 1.4826 * median(abs(d - center) for d in diffs) / math.sqrt(2)


def tail_noise(rises: deque[float]) -> float:
    """Standard deviation of the Gaussian noise whose second-highest of as many rises reaches as far
    above their median as these do (from the median: a falling loss's rises are all negative)."""
    n = len(rises)
    if n < MIN_TAIL_RISES:
        return 0.0
    second_highest = sorted(rises)[-2] - median(rises)
    # Where the second-highest of n standard normals falls (Blom's plotting position; within 3% of
    # simulated rises at n = 15 and 100).
    expected = RISE_WIDTH * NormalDist().inv_cdf((n - 1.375) / (n + 0.25))
    return max(second_highest, 0.0) / expected


def level(values: deque[float]) -> float:
    return median(list(values)[-LEVEL_STEPS:])


def limit(values: deque[float], rises: deque[float], sigma: float, floor: float) -> float:
    """The highest value accepted next: the recent level plus the larger of sigma x noise (its larger
    reading, from the bulk or the tail) and the floor."""
    return level(values) + max(sigma * max(robust_noise(values), tail_noise(rises)), floor)


class SpikeGuard:
    def __init__(
        self,
        window: int = 100,
        sigma: float = 6.0,
        min_loss_jump: float = 0.5,
        min_grad_ratio: float = 100.0,
        warmup_steps: int = 20,
        patience: int = 3,
    ):
        self.sigma, self.min_loss_jump, self.warmup_steps = sigma, min_loss_jump, warmup_steps
        self.patience = patience
        self.rejected: list[tuple[float, float]] = []  # the spikes since the last applied step
        self.min_log_grad_jump = math.log(min_grad_ratio)
        self.losses: deque[float] = deque(maxlen=window)  # applied steps
        self.log_norms: deque[float] = deque(maxlen=window)
        self.loss_rises: deque[float] = deque(maxlen=window)  # every judged step's, over the level then
        self.log_norm_rises: deque[float] = deque(maxlen=window)

    def verdict(self, loss: float, norm: float) -> str | None:
        """One of "non_finite", "loss_spike", "grad_norm_spike", "level_shift" (the `patience`-th spike
        in a row: apply it, the level has moved), or None for a step to apply."""
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return "non_finite"
        if len(self.losses) < max(self.warmup_steps, 2):
            return None
        spike = None
        if loss > self.loss_limit():
            spike = "loss_spike"
        elif norm > 0 and len(self.log_norms) >= 2 and math.log(norm) > self.log_norm_limit():
            spike = "grad_norm_spike"
        if spike is not None and len(self.rejected) + 1 >= self.patience:
            return "level_shift"
        return spike

    def record_rises(self, loss: float, norm: float) -> None:
        if len(self.losses) >= LEVEL_STEPS:
            self.loss_rises.append(loss - level(self.losses))
        if norm > 0 and len(self.log_norms) >= LEVEL_STEPS:
            self.log_norm_rises.append(math.log(norm) - level(self.log_norms))

    def reject(self, loss: float, norm: float) -> None:
        """Record a step judged a spike (not applied). A non-finite one says nothing of the level or the
        noise: it is left out of both."""
        if math.isfinite(loss) and math.isfinite(norm):
            self.rejected.append((loss, norm))

    def shift_level(self, loss: float, norm: float) -> None:
        """The run's level moved: the recent spikes and this step become the window, and the rises
        measured against the old level are dropped."""
        steps = [*self.rejected, (loss, norm)]
        self.rejected = []
        for window in (self.losses, self.log_norms, self.loss_rises, self.log_norm_rises):
            window.clear()
        for spike_loss, spike_norm in steps:
            self.accept(spike_loss, spike_norm)

    def loss_limit(self) -> float:
        return limit(self.losses, self.loss_rises, self.sigma, self.min_loss_jump)

    def log_norm_limit(self) -> float:
        return limit(self.log_norms, self.log_norm_rises, self.sigma, self.min_log_grad_jump)

    def accept(self, loss: float, norm: float) -> None:
        """Record an applied step, and the rises of the spikes rejected just before it."""
        for step in [*self.rejected, (loss, norm)]:
            self.record_rises(*step)
        self.rejected = []
        self.losses.append(loss)
        if norm > 0:
            self.log_norms.append(math.log(norm))

    def summary(self) -> dict:
        """What an event records beside the loss and norm: the limits the step was judged against."""
        if len(self.losses) < 2:
            return {}
        record = {"loss_limit": self.loss_limit()}
        if len(self.log_norms) >= 2:
            record["grad_norm_limit"] = math.exp(self.log_norm_limit())
        return record

    WINDOWS = ("losses", "log_norms", "loss_rises", "log_norm_rises")

    def state_dict(self) -> dict:
        return {**{name: list(getattr(self, name)) for name in self.WINDOWS}, "rejected": self.rejected}

    def load_state_dict(self, state: dict) -> None:
        for name in self.WINDOWS:
            getattr(self, name).clear()
            getattr(self, name).extend(state.get(name, ()))  # checkpoints before the rises have none
        self.rejected = [tuple(r) for r in state.get("rejected", [])]
