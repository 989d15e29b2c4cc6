"""The arithmetic every experiment judges with, and verdict rules as data.

A verdict is the first rule of an ordered list whose test holds for a measurement:

    RULES = [Rule("not measured", lambda m: m.a is None),
             Rule("within noise (2 s.e. = {twice_noise:.3f})", lambda m: m.differs is False),
             Rule("reproduced", lambda m: m.a > m.b),
             Rule("not reproduced")]            # no test: the fallback, always last
    judge(RULES, m)

so an experiment's rules read as a table next to its measurement, and the text of a verdict may quote the
measurement's fields (`{name:spec}` is filled from the measurement's attributes and properties).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

# ----------------------------------------------------------------------------- small statistics


def binom_se(p: float, n: int) -> float:
    """Standard error of a proportion; p is kept half a count away from 0 and 1 (0 of n is not certainty)."""
    n = max(n, 1)
    p = min(max(p, 0.5 / n), 1 - 0.5 / n)
    return math.sqrt(p * (1 - p) / n)


def differs(a: float, b: float, noise: float | None) -> bool | None:
    """True when |a - b| is above twice the noise, None when there is no noise estimate."""
    if noise is None:
        return None
    return abs(a - b) > 2 * noise


def tokens_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """First token count at which a (tokens, loss) curve reaches `target` (linear interpolation)."""
    prev = None
    for t, v in points:
        if v <= target:
            if prev is None:
                return t
            (t0, v0) = prev
            return t0 + (t - t0) * (v0 - target) / max(v0 - v, 1e-12)
        prev = (t, v)
    return None


def budget_to_reach(points: list[tuple[float, float]], target: float) -> tuple[float | None, str]:
    """Budget (tokens) at which final losses of runs at several budgets reach `target`, interpolating
    the loss linearly in log(tokens). Returns (tokens, how): how is 'interpolated', 'below smallest budget'
    (an upper bound on the tokens needed) or 'not reached'."""
    pts = sorted(points)
    if not pts:
        return None, "no runs"
    if pts[0][1] <= target:
        return pts[0][0], "below smallest budget"
    for (t0, v0), (t1, v1) in zip(pts, pts[1:]):
        if v1 <= target:
            frac = (v0 - target) / max(v0 - v1, 1e-12)
            return math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0))), "interpolated"
    return None, "not reached"


def val_curve(hist: list[dict], tokens_per_step: int) -> list[tuple[float, float]]:
    """(tokens, validation loss) at every step of a metrics.jsonl history that evaluated."""
    return [(r["step"] * tokens_per_step, r["val_loss"]) for r in hist if "val_loss" in r]


def fmt(v, spec=".3f", none="-") -> str:
    return none if v is None else format(v, spec)


# ----------------------------------------------------------------------------- verdict rules


@dataclass(frozen=True)
class Rule:
    verdict: str  # the text; `{field:spec}` is filled from the measurement
    when: Callable[[Any], bool] | None = None  # None: always (the fallback, last in its list)


class _Fields(dict):
    """format_map's view of a measurement: attributes and properties by name."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def __missing__(self, key):
        return getattr(self.m, key)


def judge(rules: list[Rule], m) -> str:
    """The verdict of the first rule whose test holds for measurement `m`."""
    for rule in rules:
        if rule.when is None or rule.when(m):
            return rule.verdict.format_map(_Fields(m))
    raise ValueError("a rule list ends with a fallback Rule (no test)")


@dataclass
class Comparison:
    """A claim `a > b`, measured, with the noise of the difference (None: no estimate)."""

    a: float | None
    b: float | None
    noise: float | None

    @property
    def differs(self) -> bool | None:
        return differs(self.a, self.b, self.noise)

    @property
    def twice_noise(self) -> float:
        return 2 * self.noise


# The claim "a beats b", for experiments whose only judgement is a difference against its noise.
BEATS = [
    Rule("not measured", lambda c: c.a is None or c.b is None),
    Rule("within noise (2 s.e. = {twice_noise:.3f})", lambda c: c.differs is False),
    Rule("reproduced", lambda c: c.a > c.b),
    Rule("not reproduced (reversed beyond noise)"),
]
