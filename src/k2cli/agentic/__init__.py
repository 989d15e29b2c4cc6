"""Agentic data synthesis (K2 section 3.1.1) and the tool environments behind it.

    tools.py       per-episode state over the synthetic world, base operations, the Tool wrapper, spec validation
    toolgen.py     categories -> application domains -> tools -> evolved variants (1,000+)
    agents.py      system prompt + tool subset, sampled with diversity
    tasks.py       task templates -> tasks with rubrics (actions, pattern, checkpoints, state hash, facts)
    simulators.py  the user simulator and the tool simulator (transient errors, partial failures, timeouts)
    policies.py    the agent: the built-in planner, a k2 model (k2:<ref>), an OpenAI-compatible endpoint
    episode.py     the multi-turn loop, batched across episodes
    judge.py       execution-based rubric checks + an optional model judge
    mcp_tools.py   real tools over MCP (stdio, the official SDK)
    synthesis.py   planning agents and tasks, token budgets, loading a dataset's environment

The stage is `k2 agentic` (stages/agentic.py); the evaluation suite is `agentic` (eval/agentic.py).
"""

from __future__ import annotations


def tool_world(ref: str):
    """`k2 chat --tools REF` / `k2 serve`: the canonical tools of an agentic dataset over one persistent
    Env, as {name: (OpenAI spec, fn(arguments) -> result)}. None for a dataset without tools.json
    (the chat falls back to its read-only directory)."""
    from k2cli.artifacts import open_artifact

    try:
        art = open_artifact(ref, kind="dataset")
    except Exception:  # noqa: BLE001 - a world.json path or a missing artifact: not ours to handle
        return None
    if not art.has("tools.json"):
        return None
    from k2cli.agentic.synthesis import load_environment
    from k2cli.agentic.tools import Env

    env = load_environment(art)
    state = Env(env.tables)
    return {t.name: (t.spec(), (lambda tool: lambda args: tool.execute(state, args))(t))
            for t in env.tools.values() if t.origin == "base"}


def tokenizer_texts(world, n: int = 200, seed: int = 0) -> list[str]:
    """n tool-use conversations rendered in the chat format (tool declarations included), solved by the
    planner over `world`. A tokenizer trained on the corpus plus these learns merges for the JSON of
    tool schemas and calls (about half the tokens per agentic conversation with the tiny 2,048 BPE)."""
    from k2cli.agentic.agents import AgentConfig
    from k2cli.agentic.episode import new_episode, run_episodes
    from k2cli.agentic.policies import PlannerPolicy
    from k2cli.agentic.simulators import SimConfig
    from k2cli.agentic.synthesis import TaskConfig, plan_tasks
    from k2cli.agentic.toolgen import ToolGenConfig, generate_tools
    from k2cli.agentic.tools import WorldTables
    from k2cli.data.chat import render_text

    tables = WorldTables(world, seed)
    toolset = generate_tools(ToolGenConfig(count=300), seed)
    plan = plan_tasks(toolset.tools, toolset.heldout, tables, AgentConfig(count=max(1, n // 2), test_count=0, tools_min=1, tools_max=3),
                      TaskConfig(per_agent=2), seed)
    agents = {a["id"]: a for a in plan.agents}
    eps = [new_episode(t, agents[t["agent_id"]], plan.tools, tables, SimConfig(), seed, 8) for t in plan.tasks[:n]]
    run_episodes(eps, PlannerPolicy())
    return [render_text(ep.messages, ep.tool_specs) for ep in eps]
