"""Learning-rate schedule: linear warmup by steps, then cosine by tokens down to a floor."""

import math


def lr_factor(
    step: int, tokens: int, warmup_steps: int, warmup_tokens: int, total_tokens: int, floor: float
) -> float:
    """Multiplier of each group's base lr for the step about to run.

    `step` counts optimizer steps done so far and `tokens` the tokens consumed by them; the cosine runs
    from the end of warmup (`warmup_tokens`) to `total_tokens` and ends at `floor` (min_lr / lr)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_tokens - warmup_tokens, 1)
    progress = min(max(tokens - warmup_tokens, 0) / span, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
