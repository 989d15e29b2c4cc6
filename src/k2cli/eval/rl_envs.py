"""The `rl_envs` suite: held-out reward per RL environment, the model in the loop, greedy.

The same pools as `k2 rl` (rl/env.py), built from the datasets in the model's lineage (or --data):
math, logic, instruct and code from the synthetic world, tools when an agentic dataset is in the
lineage, and chat (no verifier: the fraction of its rubric's facts the reply states). Budgets are
the environments' defaults, which the tiny RL recipe uses too, and problem pools depend on the
data only, so `k2 eval sft:latest rl:latest --suite rl_envs` compares the two on the very same
held-out problems.

Metrics: <env>_reward (mean reward of the held-out episodes; chat: chat_facts), <env>_truncated
(episodes cut at their budget), mean_reward (over the verifiable environments).
"""

from __future__ import annotations

import numpy as np

from k2cli.errors import K2Error
from k2cli.eval.suite import SuiteResult, register
from k2cli.rl.env import EnvConfig, build_pools, find_agentic, load_world_data
from k2cli.rl.evaluate import heldout_rewards

ENVS = ("math", "logic", "instruct", "code", "tools", "chat")


def _data(ctx):
    cfg = EnvConfig(data=ctx.cfg.data if ctx.data_art is not None and ctx.data_art.has("world.json") else "",
                    unsafe_sandbox=ctx.cfg.unsafe_sandbox)
    try:
        data = load_world_data(ctx.model_art, cfg)
    except K2Error:
        return None, cfg
    data.agentic = find_agentic(ctx.model_art)
    return data, cfg


@register
class RLEnvs:
    name = "rl_envs"
    description = "held-out reward per RL environment (math, logic, instruct, code, tools, chat), greedy"

    def applies(self, ctx):
        if not ctx.is_chat_model:
            return "not a chat model (evaluate a model made by k2 sft or rl)"
        if _data(ctx)[0] is None:
            return "no synthetic-world dataset (world.json) in the model's lineage (pass --data)"
        return None

    def run(self, ctx) -> SuiteResult:
        data, cfg = _data(ctx)
        context = min(ctx.model.config.max_position_embeddings, 1024)
        pools, skipped = {}, []
        for n in ENVS:
            if n == "tools" and data.agentic is None:
                continue
            try:
                pools.update(build_pools(data, cfg, [n], ctx.tokenizer, context))
            except K2Error as e:  # e.g. no problem fits this model's context
                skipped.append(f"{n} skipped: {e.message}")
        names = list(pools)
        was_training = ctx.model.training
        try:
            found, trajs = heldout_rewards(ctx.model, ctx.tokenizer, pools, context, ctx.cfg.max_examples, ctx.cfg.seed,
                                           ctx.cfg.batch_size)
        finally:
            ctx.model.train(was_training)
        metrics = {}
        for n in names:
            key = f"heldout_{n}" if pools[n].env.verifiable else f"heldout_{n}_facts"
            if key in found:
                metrics[key.replace("heldout_", "") if key.endswith("_facts") else f"{n}_reward"] = found[key]
            if f"heldout_{n}_truncated" in found:
                metrics[f"{n}_truncated"] = found[f"heldout_{n}_truncated"]
        verifiable = [metrics[f"{n}_reward"] for n in names if f"{n}_reward" in metrics]
        metrics["mean_reward"] = float(np.mean(verifiable)) if verifiable else 0.0
        rows = [{"env": t.env_name, "prompt": t.prompt[:70], "reply": t.response[:70], "reward": round(t.reward, 3),
                 "truncated": t.truncated} for t in trajs[:: max(1, len(trajs) // 30)]]
        counts = ", ".join(f"{n} {min(ctx.cfg.max_examples, len(pools[n].test))}" for n in names)
        return SuiteResult(metrics=metrics, rows=rows,
                           notes=[f"held-out problems per environment: {counts}; greedy, budgets = environment defaults"] + skipped)
