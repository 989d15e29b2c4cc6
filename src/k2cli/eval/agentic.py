"""The `agentic` suite: held-out tool-use tasks with the model in the loop.

    model -> parse_assistant -> tool executor (the dataset's tools on a fresh Env) -> user simulator
          -> ... until the user is done, then the task's rubric judges it (the same judge as the data)

Tasks are the held-out split of the agentic dataset that the model's SFT read (found in its
lineage, or --data): new draws with tools the training trajectories used ("seen") and tasks whose
tools no training trajectory had ("unseen": held-out application domains and evolved variants).
Generation is greedy, 3 x eval.max_new_tokens per turn (96 at the tiny recipe's 32); the tool
simulator injects no errors, so the numbers measure the model.

Metrics: well_formed_rate (assistant turns that parse cleanly, finish, and call declared tools
with schema-valid arguments; also per seen/unseen), parse_ok_rate (turns that parse and finish,
whatever they call), tool_call_well_formed_rate (well-formed over turns that call tools),
success_rate (all / seen / unseen), checkpoint_rate, avg_turns.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from k2cli import lineage
from k2cli.eval.suite import SuiteResult, register

MAX_TURNS = 6
TURN_TOKENS_FACTOR = 3  # per assistant turn: 3 x eval.max_new_tokens (a tool call with its arguments is ~40-60 tiny tokens)


AGENTIC_FILES = ("tasks.jsonl", "tools.json")


def find_agentic_dataset(ctx):
    """--data when it holds tasks, else the nearest dataset in the model's lineage made by `k2 agentic`."""
    if ctx.data_art is not None and all(ctx.data_art.has(f) for f in AGENTIC_FILES):
        return ctx.data_art
    return lineage.dataset(ctx.model_art, *AGENTIC_FILES)


def select_tasks(tasks: list[dict], n: int, seed: int) -> list[dict]:
    """Up to n held-out tasks, half with seen tools and half with unseen ones where both exist."""
    rng = np.random.default_rng(seed)
    groups = {s: [t for t in tasks if t["split"] == "test" and t["tool_source"] == s] for s in ("seen", "unseen")}
    half = n // 2
    take = {"seen": min(len(groups["seen"]), max(half, n - len(groups["unseen"])))}
    take["unseen"] = min(len(groups["unseen"]), n - take["seen"])
    out = []
    for s, k in take.items():
        idx = np.sort(rng.permutation(len(groups[s]))[:k])
        out += [groups[s][int(i)] for i in idx]
    return out


@register
class Agentic:
    name = "agentic"
    description = "held-out tool-use tasks (seen and unseen tools), model in the loop: well-formed calls, success, turns"

    def applies(self, ctx):
        if not ctx.is_chat_model:
            return "not a chat model (evaluate a model made by k2 sft or rl)"
        if find_agentic_dataset(ctx) is None:
            return "no agentic dataset in the model's lineage (pass --data with a 'k2 agentic' artifact)"
        return None

    def run(self, ctx) -> SuiteResult:
        from k2cli.agentic.episode import new_episode, run_episodes
        from k2cli.agentic.judge import judge_episode
        from k2cli.agentic.policies import ModelPolicy, PolicyConfig
        from k2cli.agentic.simulators import SimConfig
        from k2cli.agentic.synthesis import load_environment

        art = find_agentic_dataset(ctx)
        env = load_environment(art)
        tasks = [t for t in select_tasks(env.tasks, ctx.cfg.max_examples, ctx.cfg.seed) if t["agent_id"] in env.agents
                 and all(n in env.tools for n in env.agents[t["agent_id"]]["tools"])]
        policy = ModelPolicy(ctx.model, ctx.tokenizer, PolicyConfig(name="k2:eval", temperature=0.0, batch_size=ctx.cfg.batch_size,
                                                                    max_new_tokens=TURN_TOKENS_FACTOR * ctx.cfg.max_new_tokens))
        sim = SimConfig(transient_error_rate=0.0, partial_failure_rate=0.0)
        episodes = [new_episode(t, env.agents[t["agent_id"]], env.tools, env.tables, sim, ctx.cfg.seed, MAX_TURNS, inject=False)
                    for t in tasks]
        was_training = ctx.model.training
        ctx.model.eval()
        try:
            run_episodes(episodes, policy)
        finally:
            ctx.model.train(was_training)
        verdicts = [judge_episode(ep, env.tables, env.tools) for ep in episodes]
        turns = sum(ep.stats["turns"] for ep in episodes)
        call_turns = sum(ep.stats["call_turns"] for ep in episodes)
        metrics = {
            "well_formed_rate": sum(ep.stats["well_formed_turns"] for ep in episodes) / max(1, turns),
            "parse_ok_rate": sum(ep.stats["parsed_turns"] for ep in episodes) / max(1, turns),
            "tool_call_well_formed_rate": sum(ep.stats["call_turns_well_formed"] for ep in episodes) / max(1, call_turns),
            "success_rate": float(np.mean([v.success for v in verdicts])) if verdicts else 0.0,
            "checkpoint_rate": float(np.mean([v.checks.get("checkpoints", 0.0) for v in verdicts])) if verdicts else 0.0,
            "avg_turns": turns / max(1, len(episodes)),
            "tasks": len(episodes),
        }
        for source in ("seen", "unseen"):
            eps = [(ep, v) for ep, v in zip(episodes, verdicts) if ep.task["tool_source"] == source]
            metrics[f"tasks_{source}"] = len(eps)
            metrics[f"success_rate_{source}"] = float(np.mean([v.success for _, v in eps])) if eps else 0.0
            metrics[f"well_formed_rate_{source}"] = (sum(ep.stats["well_formed_turns"] for ep, _ in eps)
                                                     / max(1, sum(ep.stats["turns"] for ep, _ in eps)))
        reasons = Counter(v.reason or "ok" for v in verdicts if not v.success)
        metrics.update({f"failed_{k}": v for k, v in sorted(reasons.items())})
        rows = [{"task": ep.task["id"], "tools": ep.task["tool_source"], "template": ep.task["template"], "success": v.success,
                 "turns": ep.stats["turns"], "reason": v.reason or "", "reply": ep.final_reply[:80]}
                for ep, v in list(zip(episodes, verdicts))[:40]]
        notes = [f"{len(episodes)} held-out tasks of {art.id} ({metrics['tasks_seen']} with seen tools, {metrics['tasks_unseen']} with "
                 f"unseen tools), greedy, at most {MAX_TURNS} turns, no injected tool errors; judged by the tasks' rubrics"]
        return SuiteResult(metrics=metrics, rows=rows, notes=notes)
