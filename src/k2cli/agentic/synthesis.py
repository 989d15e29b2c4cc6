"""Putting the pieces together: tools -> agents -> tasks -> episodes -> judged, filtered trajectories.

Used by `k2 agentic` (stages/agentic.py) and, for its environment, by the `agentic` eval suite.
Everything random flows from the recipe's seed; the planner run is deterministic end to end.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from k2cli.agentic.agents import AgentConfig, by_op, make_agent, spec_agent, tool_pool
from k2cli.agentic.tasks import TEMPLATES, TEMPLATES_BY_NAME, make_spec_task, make_task
from k2cli.agentic.tools import Tool, WorldTables
from k2cli.errors import K2Error


@dataclass
class TaskConfig:
    """Recipe section `tasks`."""

    per_agent: int = 5  # training tasks per training agent
    test_per_agent: int = 2  # held-out tasks per evaluation agent
    edge_prob: float = 0.15  # tasks drawn to hit an edge case (insufficient funds, out of stock, busy, not found)
    ask_prob: float = 0.25  # tasks whose user withholds one piece of information until asked
    templates: list[str] = field(default_factory=list)  # restrict to these templates ([] = all)
    quote_values: bool = False  # string values in double quotes in requests and replies (see tasks.quoted)

    def validate(self) -> "TaskConfig":
        if self.per_agent < 1 or self.test_per_agent < 0:
            raise K2Error("tasks.per_agent must be >= 1 and tasks.test_per_agent >= 0", "e.g. per_agent = 5")
        if not (0 <= self.edge_prob <= 1 and 0 <= self.ask_prob <= 1):
            raise K2Error("tasks.edge_prob and tasks.ask_prob must be in [0, 1]", "e.g. edge_prob = 0.15")
        unknown = [t for t in self.templates if t not in TEMPLATES_BY_NAME]
        if unknown:
            from k2cli.errors import did_you_mean

            raise K2Error(f"unknown task template '{unknown[0]}'", did_you_mean(unknown[0], TEMPLATES_BY_NAME))
        return self


@dataclass
class Plan:
    agents: list[dict]
    tasks: list[dict]
    tools: dict[str, Tool]  # every tool any agent uses (and all synthetic ones)


def _templates(cfg: TaskConfig):
    return [TEMPLATES_BY_NAME[n] for n in cfg.templates] if cfg.templates else list(TEMPLATES)


def _tasks_for(agent: dict, chosen: dict[str, Tool], n: int, split: str, tables, cfg: TaskConfig, rng, next_id) -> list[dict]:
    allowed = {t.name for t in _templates(cfg)}
    names = [t for t in agent["templates"] if t in allowed] or [agent["primary"]]
    out = []
    for _ in range(n):
        name = agent["primary"] if rng.random() < 0.5 else rng.choice(names)
        for _attempt in range(10):
            task = make_task(TEMPLATES_BY_NAME[name], chosen, tables, rng, task_id=next_id(), agent=agent, split=split,
                             edge_prob=cfg.edge_prob, ask_prob=cfg.ask_prob, quote=cfg.quote_values)
            if task is not None:
                out.append(task)
                break
    return out


def plan_tasks(tools: list[Tool], heldout: set[str], tables: WorldTables, agents_cfg: AgentConfig, tasks_cfg: TaskConfig,
               seed: int, spec_tools: list[Tool] = (), spec_tasks_per_tool: int = 3, fits=None) -> Plan:
    """Training agents and tasks (training pool), evaluation agents and tasks (seen pool / held-out tools),
    and agents + tasks for spec-only tools (MCP, --tools). `fits(tools)`: the agent's tool declarations
    leave room for a conversation."""
    rng = random.Random(f"{seed}:agents")
    counter = {"agent": 0, "task": 0}

    def next_id(kind="task"):
        counter[kind] += 1
        return f"{'A' if kind == 'agent' else 'T'}{counter[kind]:05d}"

    pool = by_op(tool_pool(tools, heldout, agents_cfg.pool, seed))
    unseen = by_op([t for t in tools if t.name in heldout and t.base])
    templates = _templates(tasks_cfg)
    agents, tasks = [], []

    def build(n_agents, split, source, n_tasks, unseen_pool=None):
        made = 0
        for attempt in range(n_agents * 40):
            if made == n_agents:
                break
            tmpl = templates[attempt % len(templates)] if split == "train" else rng.choice(templates)
            got = make_agent(rng, next_id("agent"), tmpl, pool, agents_cfg, tables.world, split=split, tool_source=source,
                             unseen=unseen_pool, fits=fits)
            if got is None:
                counter["agent"] -= 1
                continue
            agent, chosen = got
            new = _tasks_for(agent, chosen, n_tasks, split, tables, tasks_cfg, rng, next_id)
            if not new:
                continue
            agents.append(agent)
            tasks.extend(new)
            made += 1

    build(agents_cfg.count, "train", "seen", tasks_cfg.per_agent)
    n_unseen = agents_cfg.test_count // 2
    build(agents_cfg.test_count - n_unseen, "test", "seen", tasks_cfg.test_per_agent)
    if unseen and n_unseen:
        build(n_unseen, "test", "unseen", tasks_cfg.test_per_agent, unseen_pool=unseen)
    for tool in spec_tools:
        for _ in range(spec_tasks_per_tool):
            agent = spec_agent(next_id("agent"), tool, list(spec_tools), rng, tables.world)
            agents.append(agent)
            tasks.append(make_spec_task(tool, tables, rng, task_id=next_id(), agent=agent))
    by_name = {t.name: t for t in tools} | {t.name: t for t in spec_tools}
    return Plan(agents, tasks, by_name)


# ----------------------------------------------------------------------------- token budget


_PIECES = re.compile(r"<\|[a-z_]+\|>| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]|\s+")


def estimate_tokens(text: str) -> int:
    """A token count for k2's small BPEs (trained on the world's prose) when no tokenizer is at hand,
    calibrated to err long: a special token is 1, a word after a space ~0.45 per letter, a word
    glued to punctuation (JSON keys: "type") ~0.6 per letter, digits ~0.9, punctuation 1 (+1 for a
    leading space)."""
    n = 0
    for m in _PIECES.finditer(text):
        piece = m.group(0)
        core = piece.strip()
        if piece.startswith("<|"):
            n += 1
        elif not core:
            n += 1
        elif core.isalpha():
            n += max(1, round(len(core) * (0.45 if piece[0] == " " else 0.6) + 0.3))
        elif core.isdigit():
            n += max(1, round(len(core) * 0.9 + 0.3))
        else:
            n += 1 + (piece[0] == " ")
    return n


# what a short conversation (system prompt, a request, one call and its result, the answer) costs
# on top of the tool declarations, in estimated tokens: agents whose tools leave less are not made
CONVERSATION_RESERVE = 230


class TokenCounter:
    def __init__(self, tokenizer_ref: str = ""):
        self.tok = None
        self.art = None
        self._decl: dict[str, int] = {}
        self.how = "estimated"
        if tokenizer_ref:
            from k2cli.artifacts import open_artifact
            from k2cli.data.tokenizer import load_tokenizer

            art = open_artifact(tokenizer_ref, kind=("tokenizer", "model"))
            self.tok = load_tokenizer(art.path)
            self.art = art
            self.how = f"counted with the tokenizer of {art.id}"

    def __call__(self, messages: list[dict], tools: list[dict] | None) -> int:
        from k2cli.data.chat import render, render_text

        if self.tok is not None:
            return len(render(self.tok, messages, tools).ids)
        # the tool declarations are shared by all episodes of an agent: estimate them once
        key = json.dumps(tools, sort_keys=True) if tools else ""
        if key not in self._decl:
            self._decl[key] = estimate_tokens(render_text([], tools)) if tools else 0
        return self._decl[key] + estimate_tokens(render_text(messages, None))

    def fits(self, max_tokens: int, reserve: int = CONVERSATION_RESERVE):
        """A predicate on tool subsets: do their declarations leave `reserve` tokens of `max_tokens`?"""
        if not max_tokens:
            return None

        def ok(tools: list) -> bool:
            return self([], [t.spec() for t in tools]) + reserve <= max_tokens
        return ok


# ----------------------------------------------------------------------------- the environment of a dataset


@dataclass
class Environment:
    """What an agentic dataset artifact holds, loaded back: world tables, tools, agents, tasks."""

    tables: WorldTables
    tools: dict[str, Tool]
    agents: dict[str, dict]
    tasks: list[dict]
    art: object = None


def load_environment(art) -> Environment:
    """From a dataset artifact made by `k2 agentic` (tools.json, agents.jsonl, tasks.jsonl, world.json)."""
    from k2cli.data.world import WORLD_FILE, load_world

    root = Path(art.path)
    for name in ("tools.json", "agents.jsonl", "tasks.jsonl", WORLD_FILE):
        if not (root / name).is_file():
            raise K2Error(f"dataset {art.id} has no {name}", "use a dataset made by 'k2 agentic'")
    art.check("tools.json", "agents.jsonl", "tasks.jsonl", WORLD_FILE)  # they match the manifest (cached hashes)
    data = json.loads((root / "tools.json").read_text())
    tools = {}
    for d in data["tools"]:
        if d.get("base"):
            t = Tool.from_dict(d)
            tools[t.name] = t
    world = load_world(str(root / WORLD_FILE))
    seed = art.recipe.get("seed", 0) if hasattr(art, "recipe") else 0
    agents = {a["id"]: a for a in map(json.loads, (root / "agents.jsonl").read_text().splitlines()) if a}
    tasks = [json.loads(line) for line in (root / "tasks.jsonl").read_text().splitlines() if line.strip()]
    return Environment(WorldTables(world, seed), tools, agents, tasks, art)


def summarize_counts(counter: Counter, prefix: str) -> dict:
    return {f"{prefix}{k}": v for k, v in sorted(counter.items())}
