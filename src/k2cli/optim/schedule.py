"""Learning-rate schedule: warm-up, stable, decay (K2: 500 warm-up steps, constant 2e-4, cosine to 2e-5).

For a run of `total_steps` optimizer steps numbered 0 .. total_steps-1, with W = warmup_steps,
n = round(decay_fraction * total_steps) decay steps starting at s0 = total_steps - n:

    warm(step)  = min(1, (step + 1) / W)                     linear: step 0 gets peak/W, never 0
    decay(step) = 1                                          for step < s0
                = f + (1 - f) * (1 + cos(pi * p)) / 2         p = (step - s0 + 1) / n, for step >= s0
    lr(step)    = peak * min(warm, decay)                    f = final_lr_fraction

So the last step (p = 1) gets exactly peak * f. When warm-up and decay overlap (a run shorter
than W + n steps), the smaller factor wins: the curve stays continuous and still ends on the floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from k2cli.errors import K2Error


@dataclass
class ScheduleConfig:
    """Recipe section `schedule`."""

    warmup_steps: int = 20
    decay_fraction: float = 0.3  # last fraction of the steps: cosine decay to the floor
    final_lr_fraction: float = 0.1  # floor = peak lr * this (K2: 2e-4 -> 2e-5)

    def validate(self) -> None:
        if self.warmup_steps < 0:
            raise K2Error(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}", "set e.g. --set schedule.warmup_steps=20")
        if not 0 <= self.decay_fraction <= 1:
            raise K2Error(
                f"schedule.decay_fraction must be in [0, 1], got {self.decay_fraction}",
                "it is the fraction of steps spent decaying, e.g. --set schedule.decay_fraction=0.3",
            )
        if not 0 <= self.final_lr_fraction <= 1:
            raise K2Error(
                f"schedule.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}",
                "the floor is a fraction of the peak lr, e.g. --set schedule.final_lr_fraction=0.1",
            )


def lr_at(step: int, total_steps: int, peak_lr: float, cfg: ScheduleConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) in a run of `total_steps` steps."""
    if total_steps < 1:
        raise K2Error(f"a schedule needs at least 1 step, got total_steps={total_steps}", "set train.steps >= 1")
    step = min(max(step, 0), total_steps - 1)
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    n = round(cfg.decay_fraction * total_steps)
    start = total_steps - n
    decay = 1.0
    if n > 0 and step >= start:
        p = (step - start + 1) / n  # in (0, 1]; 1 at the last step
        f = cfg.final_lr_fraction
        decay = f + (1 - f) * 0.5 * (1 + math.cos(math.pi * p))
    return peak_lr * min(warm, decay)
