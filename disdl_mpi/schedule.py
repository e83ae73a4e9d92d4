"""The learning-rate schedule: a pure function of the optimizer step, so a resumed run sets the
same rate at the same step (no scheduler state to checkpoint).

``constant``: the base rate. ``cosine``: half a cosine from the base rate to 0 over the steps
after warm-up. ``step``: x0.1 at 50 % and again at 75 % of the steps after warm-up. Warm-up (any
schedule): linear from base/W to base over the first W steps.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "step")


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based) of ``total``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    if schedule == "step":
        return 0.1 ** ((t >= 0.5) + (t >= 0.75))
    return 1.0
