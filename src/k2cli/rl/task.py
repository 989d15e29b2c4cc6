"""RLTask: the shared training loop's Task for reinforcement learning.

The loop (train/loop.py) asks a task for the batch of each optimizer step and for the loss of a
micro-batch. For RL the batch is made by the policy itself:

    batch(step)   iteration = step // updates_per_rollout
                  new iteration: pi_old := the current weights, and
                    1. draw P prompts from the environment mixture (a pure function of seed and iteration)
                    2. K rollouts per prompt at the scheduled temperature (batched, KV cache, multi-turn)
                    3. rewards: verifiable ones from the environments, the rubric reward (critic win rate)
                       where there is no verifier; budget penalty, optional length reward; samples whose
                       reward function failed are dropped and counted (a prompt left with < 2 is dropped)
                    4. the critic's (correct, wrong) pairs from the verifiable prompts, plus replayed ones
                    5. PTX rows; log pi_old(y|x) of every rollout in one no-grad pass
                  same iteration: the same batch again (pi_old stays fixed while theta moves: that is
                  where tau's trust region acts)
    loss(micro)   sum over rows of  coef * term:
                    RL rows      (A - tau * (log pi_theta - log pi_old))^2 / (2 tau)   or  -A * log pi_theta (pg)
                    PTX rows     next-token negative log-likelihood of each target token
                    CRITIC rows  negative log-likelihood of the right verdict token
    weight(micro) the prompts in it (sum of 1/K_x over its rollouts): the loop divides the step's summed
                  loss by the step's number of prompts, which makes it
                  mean_x L(x) + beta * (PTX loss per token) + critic.weight * (critic loss per pair)

Exact resume: the batch of the current iteration, the critic's replay buffer (and a separate
critic's weights) are the task's state, saved inside every checkpoint; everything else is
recomputed from (seed, step, weights).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from k2cli.errors import K2Error
from k2cli.rl.batch import CRITIC, PAD, PTX, RL, PTXConfig, rows_to_tensors
from k2cli.rl.critic import Critic, CriticConfig, Pair, correct_wrong_pairs
from k2cli.rl.env import Pool
from k2cli.rl.evaluate import heldout_rewards
from k2cli.rl.objective import (LOSSES, TemperatureConfig, advantages, budget_penalty, length_rewards, policy_loss, sequence_logprobs,
                                temperature_at)
from k2cli.rl.rollout import Trajectory, run_rollouts, start
from k2cli.train.loop import TrainConfig


@dataclass
class RLConfig:
    """Recipe section `rl`. The rollouts per step are train.batch_size = prompts x samples_per_prompt."""

    samples_per_prompt: int = 8  # K
    loss: str = "k15"  # k15 (K1.5's squared loss) | pg (plain mean-baseline policy gradient)
    tau: float = 0.05  # K1.5's regulariser: larger stays closer to pi_old
    updates_per_rollout: int = 2  # optimizer steps on each batch of rollouts (pi_old fixed meanwhile)
    budget_penalty: float = 0.5  # subtracted from the reward of a response cut at its token budget
    length_penalty: float = 0.0  # weight of K1.5's length reward on verifiable prompts (0 = off)
    top_p: float = 1.0
    gen_batch_size: int = 64  # episodes per generation call
    eval_prompts: int = 64  # held-out problems per environment at each evaluation
    log_samples: int = 4  # rollouts per step written to rollouts.jsonl

    def validate(self):
        if self.samples_per_prompt < 2:
            raise K2Error(f"rl.samples_per_prompt={self.samples_per_prompt}: the mean-reward baseline needs at least 2 "
                          "samples per prompt",
                          "set rl.samples_per_prompt >= 2 (K2 and K1.5 use 8 or more)")
        if self.loss not in LOSSES:
            raise K2Error(f"unknown rl.loss '{self.loss}'", "use k15 (K1.5's objective) or pg (mean-baseline policy gradient)")
        if not self.tau > 0:
            raise K2Error(f"rl.tau must be > 0, got {self.tau}", "e.g. rl.tau=0.05")
        if self.updates_per_rollout < 1 or self.gen_batch_size < 1 or self.eval_prompts < 0 or self.log_samples < 0:
            raise K2Error("rl.updates_per_rollout and rl.gen_batch_size must be >= 1, rl.eval_prompts and rl.log_samples >= 0",
                          "e.g. updates_per_rollout = 2")
        if not 0 < self.top_p <= 1:
            raise K2Error(f"rl.top_p must be in (0, 1], got {self.top_p}", "e.g. rl.top_p=1.0")


class RolloutLog:
    """rollouts.jsonl: a few rollouts per step, readable. A resumed run first drops the lines of steps it redoes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.started = False

    def write(self, step: int, records: list[dict]) -> None:
        if not self.started:
            self.started = True
            if self.path.exists():
                kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] < step]
                self.path.write_text("".join(line + "\n" for line in kept))
        with open(self.path, "a") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")


class RLTask:
    """Takes its recipe sections, not a stage's recipe: envs.mix, rl, temperature, ptx, critic, train (steps,
    batch_size = rollouts per step, seq_len = the context, precision) and the seed."""

    def __init__(self, model, tokenizer, pools: dict[str, Pool], selected: dict[str, list[int]], critic: Critic,
                 ptx: list, heldout_pairs: list[Pair], run_dir: Path, first_pairs: list[Pair] = (), *,
                 mix: dict[str, float], rl: RLConfig, temperature: TemperatureConfig, ptx_cfg: PTXConfig,
                 critic_cfg: CriticConfig, train: TrainConfig, seed: int):
        self.model, self.tok = model, tokenizer
        self.pools, self.selected = pools, selected
        self.names = sorted(n for n in pools if mix.get(n, 0) > 0 and selected.get(n))
        if not self.names:
            raise K2Error("no environment has training prompts left after the prompt selection",
                          "lower select.min_rate / raise select.max_rate, or set select.k=0 to keep every prompt")
        self.mix = [mix[n] for n in self.names]
        self.cfg, self.temperature, self.ptx_cfg, self.critic_cfg = rl, temperature, ptx_cfg, critic_cfg
        self.critic, self.ptx, self.heldout_pairs = critic, ptx, heldout_pairs
        self.replay = list(first_pairs)[-critic_cfg.replay_size:] if critic_cfg.replay_size else []
        self.steps, self.context, self.seed = train.steps, train.seq_len, seed
        self.precision = train.precision
        self.K = rl.samples_per_prompt
        self.P = train.batch_size // self.K
        self.tokens_per_sequence = self.context
        self.budgets = {n: p.budget for n, p in pools.items()}
        self.log = RolloutLog(Path(run_dir) / "rollouts.jsonl")
        self.iteration, self.cached, self.pending = -1, None, {}

    # ------------------------------------------------------------------ the loop's Task protocol
    def batch(self, step: int) -> dict:
        it = step // self.cfg.updates_per_rollout
        if it != self.iteration:
            self.cached = self.collect(step, it)
            self.iteration = it
        return self.cached

    def weight(self, micro: dict) -> float:
        return float(micro["unit"].sum())

    def loss(self, model, micro: dict, max_logits: bool) -> tuple[torch.Tensor, dict, object]:
        n = int(micro["length"].max())  # trim the padding this micro-batch does not need (the step's one host read: shapes)
        logits, stats = model(micro["input_ids"][:, :n], stats=True, max_logits=max_logits)  # [B, n, V]
        tok_logp, seq_logp = sequence_logprobs(logits, micro["targets"][:, :n])  # [B, n], [B]
        kind, coef = micro["kind"], micro["coef"]
        rl = (kind == RL).float()
        token_rows = ((kind == PTX) | (kind == CRITIC)).float()
        # every row enters both sums with a 0/1 factor, so the result is always part of the graph
        total = policy_loss(seq_logp, micro["old_logp"], micro["adv"], coef * rl, self.cfg.tau, self.cfg.loss)
        total = total - ((coef * token_rows)[:, None] * tok_logp).sum()
        # how far the policy moved from the one that sampled (RL rows only): device tensors, which the
        # loop moves to the host with the rest of the step's log (no sync here)
        ratio = (seq_logp - micro["old_logp"]).detach().float()
        extras = {"log_ratio_mean": (ratio * rl).sum() / rl.sum().clamp(min=1), "log_ratio_abs_max": (ratio.abs() * rl).max(),
                  # how much K1.5's per-sample gradient weight (A - tau * log-ratio) differs from plain policy
                  # gradient's (A): k15_shift / adv_abs = sum |tau * log-ratio| / sum |A| over the step's RL rows
                  # (sums, so that the ratio of the step's logged values is exact); 0 at theta = theta_old, where
                  # the two objectives coincide (in a pg run: the correction K1.5 would have made)
                  "k15_shift": (self.cfg.tau * ratio.abs() * rl).sum(), "adv_abs": (micro["adv"].abs() * rl).sum()}
        return total, extras, stats

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        metrics, _ = heldout_rewards(model, self.tok, self.pools, self.context, self.cfg.eval_prompts, self.seed,
                                     self.cfg.gen_batch_size)
        acc = self.critic.accuracy(self.heldout_pairs)
        if acc is not None:
            metrics["critic_accuracy"] = acc
        return metrics

    # optional hooks of the loop: metrics of this step's rollouts, and state for exact resume
    def step_metrics(self) -> dict:
        out, self.pending = self.pending, {}
        return out

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "batch": self.cached, "critic": self.critic.state_dict(),
                "replay": [dataclasses.asdict(p) for p in self.replay]}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.iteration, self.cached = state["iteration"], state["batch"]
            self.critic.load_state_dict(state.get("critic"))
            self.replay = [Pair(**p) for p in state.get("replay", [])]

    # ------------------------------------------------------------------ making a batch
    def prompts(self, it: int) -> list[tuple[str, int]]:
        """P (environment, problem index) draws for iteration `it`: the mixture, then a selected problem."""
        rng = random.Random(f"{self.seed}:prompts:{it}")
        out = []
        for _ in range(self.P):
            name = rng.choices(self.names, weights=self.mix)[0]
            out.append((name, rng.choice(self.selected[name])))
        return out

    def collect(self, step: int, it: int) -> dict:
        t0 = time.perf_counter()
        temp = temperature_at(step, self.steps, self.temperature)
        trajs = [start(self.pools[name].make("train"), name, g, index, self.seed, self.tok)
                 for g, (name, index) in enumerate(self.prompts(it)) for _ in range(self.K)]
        seed = random.Random(f"{self.seed}:roll:{it}").randrange(2**31)
        run_rollouts(self.model, self.tok, trajs, self.budgets, self.context, temp, seed, self.cfg.top_p, self.cfg.gen_batch_size)
        groups, stats = self.rewards(trajs)
        pairs = correct_wrong_pairs([g for g in groups if self.pools[g[0].env_name].env.verifiable],
                                    self.critic_cfg.pairs_per_group, lambda t: t.env.rubric())
        fresh = self.critic.accuracy(pairs)  # prequential: judged before the critic learns from them
        learn = pairs + self.replayed(it)
        self.replay = (self.replay + pairs)[-self.critic_cfg.replay_size:] if self.critic_cfg.replay_size else []
        critic_loss = self.critic.train_step(learn) if self.critic.separate else None
        rng = random.Random(f"{self.seed}:ptx:{it}")
        ptx = [self.ptx[rng.randrange(len(self.ptx))] for _ in range(self.ptx_cfg.rows)] if self.ptx else []
        critic_rows = self.critic.rows(learn) if not self.critic.separate and self.critic_cfg.weight > 0 else []
        batch, losses = self.assemble(groups, ptx, critic_rows)
        self.log.write(step + 1, self.samples(step + 1, groups))
        stats.update(losses)
        stats.update({"temperature": temp, "critic_pairs": len(pairs), "rollout_s": time.perf_counter() - t0})
        if fresh is not None:
            stats["critic_accuracy_fresh"] = fresh
        if critic_loss is not None:
            stats["critic_loss"] = critic_loss
        self.pending = stats
        return batch

    def replayed(self, it: int) -> list[Pair]:
        """`critic.replay` earlier pairs from the buffer, drawn with (seed, iteration)."""
        k = min(self.critic_cfg.replay, len(self.replay))
        return random.Random(f"{self.seed}:replay:{it}").sample(self.replay, k) if k else []

    def rewards(self, trajs: list[Trajectory]) -> tuple[list[list[Trajectory]], dict]:
        """Shape each sample's reward into t.info["final"]; return the kept groups and rollout statistics."""
        groups: dict[int, list[Trajectory]] = {}
        for t in trajs:
            groups.setdefault(t.group, []).append(t)
        kept, dropped_groups = [], 0
        rubric_groups = []
        for ts in groups.values():
            ok = [t for t in ts if t.error is None]
            if len(ok) < 2:
                dropped_groups += 1
                continue
            kept.append(ok)
            if self.pools[ok[0].env_name].env.verifiable:
                for t in ok:
                    t.info["final"] = budget_penalty(t.reward, t.truncated, self.cfg.budget_penalty)
                if self.cfg.length_penalty > 0:
                    lam = length_rewards([t.generated for t in ok], [bool(t.info.get("correct")) for t in ok])
                    for t, x in zip(ok, lam):
                        t.info["final"] += self.cfg.length_penalty * x
            else:
                rubric_groups.append(ok)
        if rubric_groups:  # the self-critique rubric reward: win rates among each prompt's K replies
            wins = self.critic.win_rates([(g[0].prompt, g[0].env.rubric(), [t.response for t in g]) for g in rubric_groups])
            for g, w in zip(rubric_groups, wins):
                for t, x in zip(g, w):
                    t.info["final"] = budget_penalty(x, t.truncated, self.cfg.budget_penalty)
        flat = [t for g in kept for t in g]
        stats = {"dropped_samples": sum(t.error is not None for t in trajs), "dropped_prompts": dropped_groups,
                 "response_tokens": float(np.mean([t.generated for t in trajs])),
                 "truncated_rate": float(np.mean([t.truncated for t in trajs])),
                 "reward_mean": float(np.mean([t.info["final"] for t in flat])) if flat else 0.0,
                 "prompts_without_signal": sum(len({t.info["final"] for t in g}) == 1 for g in kept)}
        for name in sorted({t.env_name for t in flat}):
            ts = [t for t in flat if t.env_name == name]
            key = "reward" if self.pools[name].env.verifiable else "rubric_reward"
            stats[f"{key}_{name}"] = float(np.mean([t.reward if key == "reward" else t.info["final"] for t in ts]))
        return kept, stats

    def assemble(self, groups: list[list[Trajectory]], ptx: list, critic_rows: list) -> tuple[dict, dict]:
        """Rows -> tensors with coef/adv/unit/old_logp; see rl/batch.py for the layout."""
        rows, kinds, coefs, advs, units = [], [], [], [], []
        rewards = torch.tensor([t.info["final"] for g in groups for t in g], dtype=torch.float32)
        group = torch.tensor([i for i, g in enumerate(groups) for _ in g], dtype=torch.long)
        advs = advantages(rewards, group, len(groups)).tolist()  # r_i - rbar(x)
        for g in groups:
            for t in g:
                rows.append((t.ids, t.mask))
                kinds.append(RL)
                coefs.append(1.0 / len(g))  # a prompt's rollouts share one unit: the mean over its K_x samples
                units.append(1.0 / len(g))
        prompts = max(len(groups), 1)  # the unit the loop divides by
        n_ptx = sum(sum(m[1:]) for _, m in ptx)
        for ids, mask in ptx:
            rows.append((ids, mask))
            kinds.append(PTX)
            advs.append(0.0)
            coefs.append(self.ptx_cfg.beta * prompts / max(n_ptx, 1))  # beta x (PTX loss per token) after / prompts
            units.append(0.0)
        for ids, mask in critic_rows:
            rows.append((ids, mask))
            kinds.append(CRITIC)
            advs.append(0.0)
            coefs.append(self.critic_cfg.weight * prompts / len(critic_rows))
            units.append(0.0)
        if not groups:  # every sample dropped: the remaining rows still train, and carry the one unit
            units = [1.0 / len(rows)] * len(rows) if rows else []
        if not rows:  # nothing at all survived this step: one inert row keeps the loop going (zero loss)
            rows, kinds, advs, coefs, units = [([self.tok.eot_id] * 2, [False, False])], [PAD], [0.0], [0.0], [1.0]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths share a micro-batch: less padding
        rows, kinds, advs, coefs, units = ([x[i] for i in order] for x in (rows, kinds, advs, coefs, units))
        batch = rows_to_tensors(rows, self.tok.eot_id)
        batch.update(kind=torch.tensor(kinds), coef=torch.tensor(coefs), adv=torch.tensor(advs), unit=torch.tensor(units))
        old, token_loss = self.old_logprobs(batch)
        batch["old_logp"] = old
        losses = {}
        for kind, key in ((PTX, "ptx_loss"), (CRITIC, "critic_loss")):
            sel = batch["kind"] == kind
            n = int((batch["targets"][sel] != -100).sum())
            if n:
                losses[key] = float(token_loss[sel].sum()) / n
        return batch, losses

    @torch.no_grad()
    def old_logprobs(self, batch: dict, chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi_old(y|x) per row [N] and the per-row token NLL sums [N], with the current weights."""
        from k2cli.train.loop import precision_for

        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        seq, nll = [], []
        try:
            for s in range(0, batch["input_ids"].shape[0], chunk):
                n = int(batch["length"][s: s + chunk].max())
                with precision_for(self.model, device, self.precision):
                    logits = self.model(batch["input_ids"][s: s + chunk, :n].to(device))
                tok, sq = sequence_logprobs(logits, batch["targets"][s: s + chunk, :n].to(device))
                seq.append(sq.float().cpu())
                nll.append(-tok.sum(1).float().cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(seq), torch.cat(nll)

    def samples(self, step: int, groups: list[list[Trajectory]]) -> list[dict]:
        """The first rollout of the first few prompts, for rollouts.jsonl."""
        out = []
        for g in groups[: self.cfg.log_samples]:
            t = g[0]
            out.append({"step": step, "env": t.env_name, "problem": t.index, "prompt": t.prompt, "response": t.response,
                        "reward": t.info.get("final"), "env_reward": t.reward, "truncated": t.truncated, "tokens": t.generated,
                        "group_rewards": [x.info.get("final") for x in g],
                        "info": {k: v for k, v in t.info.items() if k != "final"}})
        return out
