"""What the RL stage measures with the model in the loop, outside the gradient steps:

    heldout_rewards   greedy episodes on held-out problems: mean reward per environment
    select_prompts    prompt selection by the starting model's pass@k (K2: moderate difficulty)
    heldout_pairs     (correct, wrong) reply pairs on held-out prompts: the critic's test set

All three only sample the model; each is a pure function of the weights and the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from k2cli.errors import K2Error
from k2cli.rl.critic import Pair, correct_wrong_pairs
from k2cli.rl.env import Pool
from k2cli.rl.rollout import Trajectory, run_rollouts, start


def _budgets(pools: dict[str, Pool]) -> dict[str, int]:
    return {n: p.budget for n, p in pools.items()}


def _groups(trajs: list[Trajectory]) -> list[list[Trajectory]]:
    by: dict[int, list[Trajectory]] = {}
    for t in trajs:
        by.setdefault(t.group, []).append(t)
    return list(by.values())


def heldout_rewards(model, tokenizer, pools: dict[str, Pool], context: int, n: int, seed: int = 0,
                    batch_size: int = 64) -> tuple[dict, list[Trajectory]]:
    """Greedy episodes on the first n held-out problems of each environment.

    Metrics: heldout_<env> (mean reward; for an environment without verifier, which has no reward
    of its own, the fraction of its rubric's facts stated: heldout_<env>_facts), heldout_<env>_truncated,
    heldout_<env>_tokens."""
    trajs = []
    for name, pool in pools.items():
        for i in range(min(n, len(pool.test))):
            trajs.append(start(pool.make("test"), name, len(trajs), i, seed, tokenizer))
    run_rollouts(model, tokenizer, trajs, _budgets(pools), context, 0.0, seed, batch_size=batch_size)
    metrics = {}
    for name, pool in pools.items():
        ts = [t for t in trajs if t.env_name == name and t.error is None]
        if not ts:
            continue
        if pool.env.verifiable:
            metrics[f"heldout_{name}"] = float(np.mean([t.reward for t in ts]))
        else:
            metrics[f"heldout_{name}_facts"] = float(np.mean([t.info.get("facts", 0.0) for t in ts]))
        metrics[f"heldout_{name}_truncated"] = float(np.mean([t.truncated for t in ts]))
        metrics[f"heldout_{name}_tokens"] = float(np.mean([t.generated for t in ts]))
    return metrics, trajs


@dataclass
class SelectConfig:
    """Recipe section `select`: keep training prompts the starting model solves sometimes, not always, not never."""

    k: int = 8  # samples per candidate prompt (0 = no selection: every prompt is kept)
    candidates: int = 64  # training prompts tried per environment
    min_rate: float = 0.05  # keep prompts whose success fraction c/k is in [min_rate, max_rate]
    max_rate: float = 0.95

    def validate(self):
        if self.k < 0 or self.candidates < 1 or not 0 <= self.min_rate <= self.max_rate <= 1:
            raise K2Error("select needs k >= 0, candidates >= 1 and 0 <= min_rate <= max_rate <= 1",
                          "e.g. k = 8, candidates = 64, min_rate = 0.05, max_rate = 0.95")


def select_prompts(model, tokenizer, pools: dict[str, Pool], cfg: SelectConfig, context: int, temperature: float, seed: int,
                   batch_size: int = 64) -> tuple[dict[str, list[int]], dict, list[Pair]]:
    """Indices of the training problems to use per environment, the selection's statistics, and the
    (better, worse) reply pairs the samples contain (the critic's first training pairs).

    For a verifiable environment: `candidates` problems, k samples each at the starting temperature;
    the mean reward per problem (the success fraction c/k for 0/1 rewards); those within
    [min_rate, max_rate] are kept. A prompt whose k samples all agree gives the mean-baseline
    objective no signal anyway (every advantage is 0). Environments without verifier keep all their
    problems."""
    selected, stats, trajs, groups = {}, {}, [], 0
    for name, pool in pools.items():
        if cfg.k == 0 or not pool.env.verifiable:
            selected[name] = list(range(len(pool.train)))
            continue
        cand = sorted(random.Random(f"{seed}:select:{name}").sample(range(len(pool.train)), min(cfg.candidates, len(pool.train))))
        for i in cand:
            trajs += [start(pool.make("train"), name, groups, i, seed, tokenizer) for _ in range(cfg.k)]
            groups += 1
    run_rollouts(model, tokenizer, trajs, _budgets(pools), context, temperature, seed + 1, batch_size=batch_size)
    solved = {}
    pairs = correct_wrong_pairs(_groups(trajs), cfg.k // 2, lambda t: t.env.rubric())
    for ts in _groups(trajs):
        name = ts[0].env_name
        rate = float(np.mean([t.reward for t in ts]))  # the success fraction c/k for 0/1 rewards
        stats.setdefault(name, []).append(rate)
        solved.setdefault(name, []).append(any(t.info.get("correct") for t in ts))
        if cfg.min_rate <= rate <= cfg.max_rate:
            selected.setdefault(name, []).append(ts[0].index)
    summary = {}
    for name, rates in stats.items():
        selected.setdefault(name, [])
        summary[f"select_{name}_mean_reward"] = float(np.mean(rates))
        summary[f"select_{name}_pass@{cfg.k}"] = float(np.mean(solved[name]))
        summary[f"select_{name}_kept"] = len(selected[name])
        summary[f"select_{name}_tried"] = len(rates)
    return selected, summary, pairs


def heldout_pairs(model, tokenizer, pools: dict[str, Pool], context: int, prompts: int, samples: int, limit: int,
                  temperature: float, seed: int, batch_size: int = 64) -> list[Pair]:
    """(correct, wrong) pairs of the model's own replies to held-out prompts of the verifiable environments."""
    trajs = []
    names = [n for n, p in pools.items() if p.env.verifiable]
    for name in names:
        for i in range(min(prompts, len(pools[name].test))):
            g = len(trajs) // samples
            trajs += [start(pools[name].make("test"), name, g, i, seed, tokenizer) for _ in range(samples)]
    run_rollouts(model, tokenizer, trajs, _budgets(pools), context, temperature, seed + 2, batch_size=batch_size)
    per_env = {n: correct_wrong_pairs([g for g in _groups(trajs) if g[0].env_name == n], samples // 2, lambda t: t.env.rubric())
               for n in names}
    # interleave the environments so that a limit keeps every one of them
    out, i = [], 0
    while len(out) < limit and any(i < len(v) for v in per_env.values()):
        out += [v[i] for v in per_env.values() if i < len(v)]
        i += 1
    return out[:limit]
