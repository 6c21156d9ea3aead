"""A run that ends by a wall-clock deadline. After every step the steps left are re-estimated from the
recent step times and from what must still follow (the evaluations and checkpoints due, then the
caller's own tail), and the schedule's end (`schedule.total_tokens`) moves there, so the cosine still
reaches its floor at the last step. `teleflm demo` uses it: on a shared machine the step rate wanders
too much for a plan made once."""

import statistics
import time
from collections import deque


class Deadline:
    def __init__(
        self,
        at: float,
        evaluation_s: float,
        checkpoint_s: float,
        tail_s: float,
        min_steps: int = 1,
        window: int = 8,
    ):
        """`at`: time.time() by which the caller's program should end; `tail_s`: what it does after
        training; evaluation_s / checkpoint_s: what one evaluation / one checkpoint takes; the run
        makes at least `min_steps` steps whatever the time; the median of the last `window` step times
        is the rate."""
        self.at, self.tail_s, self.min_steps = at, tail_s, min_steps
        self.evaluation_s, self.checkpoint_s = evaluation_s, checkpoint_s
        self.recent: deque[float] = deque(maxlen=window)

    def overhead(self, cfg, step: int, end: int) -> float:
        """Seconds of the evaluations and checkpoints due after `step` up to `end`, the final ones too."""
        due = 0.0
        if cfg.logging.eval_interval:
            due += (end // cfg.logging.eval_interval - step // cfg.logging.eval_interval) * self.evaluation_s
        due += (
            end // cfg.checkpoint.interval_steps - step // cfg.checkpoint.interval_steps
        ) * self.checkpoint_s
        return due + self.evaluation_s + self.checkpoint_s

    def replan(self, trainer, step_seconds: float) -> int:
        """The run's new last step, given the step just done took `step_seconds`; sets the schedule."""
        if trainer.dims.world_size > 1:
            raise ValueError("a deadline is for one process: ranks would each move the end their own way")
        self.recent.append(step_seconds)
        per_step = statistics.median(self.recent)
        cfg, step = trainer.cfg, trainer.step
        left = self.at - time.time() - self.tail_s
        steps = max(0.0, left - self.overhead(cfg, step, step + int(left / per_step))) / per_step
        end = max(step + int(steps), self.min_steps)
        cfg.schedule.total_tokens = end * cfg.batch.global_batch_tokens
        return end
