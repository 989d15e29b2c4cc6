"""Rollouts: many episodes advanced together, each turn one batched generation with the KV cache.

A Trajectory keeps the exact tokens of its episode as ONE sequence, the way the loss will read it:

    ids   <|im_system|>...<|im_user|>user<|im_middle|>question<|im_end|><|im_assistant|>assistant<|im_middle|>
          [the policy's tokens ... <|im_end|>] [tool results / user reply, rendered] <|im_assistant|>...[policy]...
    mask   False on the prompt and on every observation, True on the tokens the policy sampled

The sampled tokens are kept as sampled (never decoded and re-encoded), so log pi(y|x) in the loss
is the log-probability of what was actually generated.

Budgets: the policy may write at most `budget` tokens per episode (all of its turns together) and
the sequence may not outgrow `context`. A turn cut at its allowance ends the episode TRUNCATED: the
environment scores what was written (usually a fail) and the task adds a penalty.

Reward functions are user code: one that raises or returns NaN/inf drops the sample (`error` set,
counted by the caller); the rollout goes on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from k2cli.data.chat import render
from k2cli.model.generate import generate
from k2cli.rl.env import Environment


@dataclass
class Trajectory:
    env: Environment  # the episode (its state and problem)
    env_name: str
    group: int  # the prompt this sample belongs to (its K siblings share it)
    index: int  # the problem's index in the pool
    ids: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    n_messages: int = 0  # messages of the observation the ids end with
    generated: int = 0  # policy tokens so far (what the budget counts)
    turns: list[str] = field(default_factory=list)  # the policy's turns, decoded
    done: bool = False
    truncated: bool = False
    reward: float = 0.0  # what the environment gave (before penalties)
    info: dict = field(default_factory=dict)
    error: str | None = None  # the reward function failed: the sample is dropped

    @property
    def prompt(self) -> str:
        return next((m.get("content") or "" for m in self.env.messages if m["role"] == "user"), "")

    @property
    def response(self) -> str:
        return "\n".join(t.split("<|im_end|>")[0].strip() for t in self.turns)


def start(env: Environment, env_name: str, group: int, index: int, seed: int, tokenizer) -> Trajectory:
    obs = env.reset(seed, index=index)
    ids = render(tokenizer, obs.messages, obs.tools, add_generation_prompt=True).ids
    return Trajectory(env, env_name, group, index, ids=ids, mask=[False] * len(ids), n_messages=len(obs.messages))


def _step(t: Trajectory, text: str, out_of_budget: bool, tokenizer, context: int) -> None:
    """Give the environment the turn; append the observation's tokens if the episode goes on."""
    try:
        obs, reward, done, info = t.env.step(text)
        reward = float(reward)
    except Exception as e:  # noqa: BLE001 - a reward function is user code: drop the sample, keep the run
        t.error, t.done = f"{type(e).__name__}: {e}"[:200], True
        return
    if not math.isfinite(reward):
        t.error, t.done = f"the reward is {reward}", True
        return
    t.reward, t.info = reward, info or {}
    if done or out_of_budget:
        t.done, t.truncated = True, out_of_budget
        return
    # the messages after the assistant's own turn: tool results or the user's reply, then a new header
    new = obs.messages[t.n_messages + 1:]
    more = render(tokenizer, new, add_generation_prompt=True).ids
    t.n_messages = len(obs.messages)
    if len(t.ids) + len(more) >= context:  # no room left to answer: the episode ends unfinished
        t.done, t.truncated = True, True
        return
    t.ids += more
    t.mask += [False] * len(more)


def run_rollouts(model, tokenizer, trajs: list[Trajectory], budgets: dict[str, int], context: int, temperature: float,
                 seed: int, top_p: float = 1.0, batch_size: int = 64) -> list[Trajectory]:
    """Advance every trajectory to its end. One round = one turn of every active episode, generated
    in batches of similar prompt lengths (less padding); each row is cut at its own allowance."""
    stop = tokenizer.stop_ids  # the template's end-of-turn token(s), then end-of-sequence
    was_training = model.training
    model.eval()
    try:
        for rnd in range(10_000):
            active = [t for t in trajs if not t.done]
            if not active:
                break
            for t in active:
                if min(budgets[t.env_name] - t.generated, context - len(t.ids)) <= 0:
                    _step(t, "", True, tokenizer, context)  # nothing left to write with
            active = sorted((t for t in active if not t.done), key=lambda t: len(t.ids))
            for b in range(0, len(active), batch_size):
                chunk = active[b: b + batch_size]
                allow = [min(budgets[t.env_name] - t.generated, context - len(t.ids)) for t in chunk]
                gens = generate(model, [t.ids for t in chunk], max_new_tokens=max(allow), temperature=temperature, top_p=top_p,
                                stop_ids=stop, seed=random.Random(f"{seed}:{rnd}:{b}").randrange(2**31))
                for t, g, a in zip(chunk, gens, allow):
                    g = g[:a]
                    finished = bool(g) and g[-1] in stop
                    t.ids += g
                    t.mask += [True] * len(g)
                    t.generated += len(g)
                    text = tokenizer.decode(g)
                    t.turns.append(text)
                    _step(t, text, not finished, tokenizer, context)
    finally:
        model.train(was_training)
    return trajs
