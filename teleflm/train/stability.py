"""The spike guard's verdict: is this step's loss or gradient norm out of line with the run's own recent
steps?

A loss is a spike when it exceeds the recent level (the median of the last `LEVEL_STEPS` applied
losses) by `sigma` times the run's step-to-step noise and by at least `min_loss_jump` nats. The noise
is measured on the differences of consecutive losses in the last `window` steps (a robust standard
deviation: 1.4826 x their median absolute deviation, over sqrt 2), so a loss that falls fast early in a
run does not read as spread, and an earlier spike does not widen it. The floor in nats is what keeps the
guard right near zero loss: a loss settled at 0.02 that wobbles to 0.08 is a 4x ratio and many of its
tiny deviations, but a 6% change in the probability of the tokens; the spikes that wreck a run are
nats high. The gradient norm is judged the same
way on a log scale, with a floor of `min_grad_ratio` times the recent level: norms differ by orders of
magnitude between runs and phases, their ratios do not. No verdict before `warmup_steps` applied steps.

A spike is a batch out of line with the model; the check comes before the update, so a step that
passes it can still leave the model worse, and then every batch after it reads as a spike. Skipping
them never recovers: after `patience` spikes in a row the guard takes the losses it rejected as the
run's new level ("level_shift", an event the trainer logs) and lets the step through.
"""

import math
from collections import deque
from statistics import median

LEVEL_STEPS = 5


class SpikeStop(RuntimeError):
    """The stability guard stopped the run (action "stop", or more events than `max_events`)."""


def robust_noise(values: deque[float]) -> float:
    """Standard deviation of one value's noise, from the differences of consecutive values."""
    diffs = [b - a for a, b in zip(list(values)[:-1], list(values)[1:], strict=True)]
    if not diffs:
        return 0.0
    center = median(diffs)
    return 1.4826 * median(abs(d - center) for d in diffs) / math.sqrt(2)


def limit(values: deque[float], sigma: float, floor: float) -> float:
    """The highest value accepted next: the recent level plus the larger of sigma x noise and the floor."""
    level = median(list(values)[-LEVEL_STEPS:])
    return level + max(sigma * robust_noise(values), floor)


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
        self.losses: deque[float] = deque(maxlen=window)
        self.log_norms: deque[float] = deque(maxlen=window)

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

    def reject(self, loss: float, norm: float) -> None:
        """Record a step judged a spike (not applied)."""
        self.rejected.append((loss, norm))

    def shift_level(self, loss: float, norm: float) -> None:
        """The run's level moved: the recent spikes and this step become the window."""
        steps = [*self.rejected, (loss, norm)]
        self.losses.clear()
        self.log_norms.clear()
        for spike_loss, spike_norm in steps:
            self.accept(spike_loss, spike_norm)

    def loss_limit(self) -> float:
        return limit(self.losses, self.sigma, self.min_loss_jump)

    def log_norm_limit(self) -> float:
        return limit(self.log_norms, self.sigma, self.min_log_grad_jump)

    def accept(self, loss: float, norm: float) -> None:
        """Record an applied step."""
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

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "log_norms": list(self.log_norms), "rejected": self.rejected}

    def load_state_dict(self, state: dict) -> None:
        self.losses.clear()
        self.log_norms.clear()
        self.losses.extend(state["losses"])
        self.log_norms.extend(state["log_norms"])
        self.rejected = [tuple(r) for r in state.get("rejected", [])]
