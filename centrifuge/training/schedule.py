"""Schedules over optimizer steps: the learning rate (linear warm-up, then
cosine decay to a floor) and which steps run the exact backward."""

from __future__ import annotations

import math

from centrifuge.selection import num_keep


class WarmupCosine:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based):
    ``(step + 1) / warmup`` during warm-up, then a cosine from 1 down to
    ``min_ratio`` at ``total - 1``. A plain object (not a closure) so that
    LambdaLR can save and restore it."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = int(warmup), int(total), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - 1 - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ExactSchedule:
    """Whether optimizer step ``step`` (0-based) runs the exact backward (masked
    loss, dense) instead of the amplified one: every ``every``-th step (steps
    ``every``, ``2·every``, ... counted from 1; 0 = none) and the last
    ``ceil(final · total)`` of the ``total`` steps (``final`` = 0: none). A pure
    function of the step and the total, so a resumed run decides at every step
    as the uninterrupted run did."""

    def __init__(self, every: int, final: float, total: int):
        self.every, self.total = int(every), int(total)
        self.first_final = self.total - num_keep(self.total, final)  # ceil, robust to 0.1 * 30

    @property
    def active(self) -> bool:
        """True when some step runs the exact backward."""
        return self.every > 0 or self.first_final < self.total

    def __call__(self, step: int) -> bool:
        return (self.every > 0 and (step + 1) % self.every == 0) or step >= self.first_final
