"""The policy objective and the reward shaping around it: pure functions on tensors and lists.

K1.5's regularised squared loss (Kimi K1.5 section 2.3.2; K2 section 3.2.3). For a prompt x
with K responses y_1..y_K sampled from pi_old, rewards r_i and their mean rbar:

    L(x) = 1/K sum_i ( r_i - rbar - tau * log(pi_theta(y_i|x) / pi_old(y_i|x)) )^2

with log pi(y|x) the SEQUENCE log-probability (the sum over the response's tokens). k2 divides
it by 2*tau (OpenKimi's `0.5*tau*(A/tau - dlogp)^2` form): the minimiser is the same, and the
gradient at theta = theta_old is then exactly the mean-baseline policy gradient,

    dL/dtheta |old = -1/K sum_i (r_i - rbar) * dlog pi(y_i|x)/dtheta

while away from theta_old the extra term tau * log-ratio * dlog-ratio pulls the policy back
towards pi_old: a trust region whose strength is tau. `pg_loss` is that plain policy gradient
(no pull back) for comparison (`--set rl.loss=pg`).

Also here: the temperature decay schedule, K1.5's length reward, and the penalty of responses
that ran out of their token budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOSSES = ("k15", "pg")


def advantages(rewards: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """r_i - rbar(x): each sample's reward minus the mean reward of its prompt's samples.

    rewards [N] float, group [N] long in [0, n_groups) -> [N]."""
    sums = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, group, rewards)
    counts = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, group, torch.ones_like(rewards))
    return rewards - (sums / counts.clamp(min=1))[group]


def k15_terms(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, tau: float) -> torch.Tensor:
    """Per sample (A - tau * log-ratio)^2 / (2 tau); logp/old_logp/adv [N] -> [N]."""
    return (adv - tau * (logp - old_logp)) ** 2 / (2 * tau)


def pg_terms(logp: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Per sample -A * log pi(y|x): the REINFORCE loss with the group mean as baseline."""
    return -adv * logp


def policy_loss(logp, old_logp, adv, weight, tau: float, kind: str = "k15") -> torch.Tensor:
    """sum_i weight_i * term_i. With weight_i = 1/K_x (K_x: the prompt's kept samples) this is
    the SUM over prompts of each prompt's mean; divided by the number of prompts it is L."""
    terms = k15_terms(logp, old_logp, adv, tau) if kind == "k15" else pg_terms(logp, adv)
    return (weight * terms).sum()


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and sequence log-probabilities of the target tokens.

    logits [N, T, V], targets [N, T] (-100 where a position is not the policy's) ->
    (token log-probs [N, T], 0 where ignored; sequence log-probs [N] = their sum)."""
    logp = -torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                               reduction="none").view(targets.shape)
    return logp, logp.sum(dim=1)


# ----------------------------------------------------------------------------- temperature


@dataclass
class TemperatureConfig:
    """Recipe section `temperature`: sampling temperature of the rollouts over the run.

    K2 decays it: high early for exploration, lower later to exploit what was learned."""

    start: float = 1.0
    end: float = 0.7
    schedule: str = "cosine"  # constant | linear | cosine | exponential

    def validate(self):
        from k2cli.errors import K2Error

        if self.schedule not in ("constant", "linear", "cosine", "exponential"):
            raise K2Error(f"unknown temperature.schedule '{self.schedule}'", "use constant, linear, cosine or exponential")
        if not (self.start > 0 and self.end > 0):
            raise K2Error("temperature.start and temperature.end must be > 0", "e.g. start = 1.0, end = 0.7")


def temperature_at(step: int, total_steps: int, cfg: TemperatureConfig) -> float:
    """Temperature of the rollouts of optimizer step `step` (0-based): start at step 0, end at the last."""
    if cfg.schedule == "constant" or total_steps <= 1:
        return cfg.start
    p = min(max(step, 0), total_steps - 1) / (total_steps - 1)  # 0 .. 1
    if cfg.schedule == "linear":
        return cfg.start + (cfg.end - cfg.start) * p
    if cfg.schedule == "cosine":
        return cfg.end + (cfg.start - cfg.end) * 0.5 * (1 + math.cos(math.pi * p))
    return cfg.start * (cfg.end / cfg.start) ** p  # exponential: a constant ratio per step


# ----------------------------------------------------------------------------- reward shaping


def budget_penalty(reward: float, truncated: bool, penalty: float) -> float:
    """A response cut at its token budget keeps what its (truncated) text earned, minus `penalty`."""
    return reward - penalty if truncated else reward


def length_rewards(lengths: list[int], correct: list[bool]) -> list[float]:
    """K1.5's length reward within one prompt's samples:

        lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)
        +lambda_i if the response is correct, +min(0, lambda_i) if it is wrong

    so the shortest correct answers gain up to 0.5 and long wrong ones lose up to 0.5.
    All lengths equal: no length reward."""
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    out = []
    for n, ok in zip(lengths, correct):
        lam = 0.5 - (n - lo) / (hi - lo)
        out.append(lam if ok else min(0.0, lam))
    return out
