"""Agents: a system prompt plus a small tool subset, sampled with diversity from a seed.

An agent is built around one task template (so it can solve something): it gets a tool for
every base operation the template needs — preferring one application domain, so a CRM agent
gets CRM tools — then distractor tools of the same category up to `tools_max`. Tool subsets
stay small (2-3 tools by default): the tool declarations are part of every prompt, and the
tiny model's context is 512 tokens. The system prompt names a role and an organisation of the
world, in one of several phrasings.

Training agents draw tools from the training pool (never a held-out tool); evaluation agents
are drawn twice: from the same pool ("seen" tools) and with held-out tools for the operations
their task needs ("unseen" tools).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from k2cli.agentic.tasks import TEMPLATES, Template
from k2cli.agentic.tools import BASE_OPS, Tool
from k2cli.errors import K2Error

ROLES = {"directory": ["directory assistant", "people finder", "contacts assistant"],
         "finance": ["banking assistant", "payments assistant", "account manager"],
         "scheduling": ["scheduling assistant", "calendar assistant", "office manager"],
         "commerce": ["shop assistant", "order desk", "sales assistant"],
         "utilities": ["helpful assistant", "calculator assistant", "date helper"]}
SYSTEM = ["You are the {role} of {org}. Be brief.",
          "You are {org}'s {role}. Use the tools; answer briefly.",
          "{org} {role}. Use the tools; be brief.",
          "You work as a {role} for {org}. Keep replies short."]


def system_prompt(rng: random.Random, role: str, org: str) -> str:
    text = rng.choice(SYSTEM).format(role=role, org=org)
    return text.replace("s's ", "s' ")  # "Horizon Hotels' ..."


@dataclass
class AgentConfig:
    """Recipe section `agents`."""

    count: int = 200  # training agents
    test_count: int = 40  # evaluation agents: half with seen tools, half with held-out ("unseen") tools
    tools_min: int = 2
    tools_max: int = 3
    pool: int = 0  # distinct synthetic tools training agents draw from; 0 = every tool not held out (base tools always in)
    same_domain: float = 0.8  # chance that each needed tool comes from the agent's own application domain

    def validate(self) -> "AgentConfig":
        if self.count < 1 or self.test_count < 0:
            raise K2Error("agents.count must be >= 1 and agents.test_count >= 0", "e.g. agents.count=200")
        if not 1 <= self.tools_min <= self.tools_max:
            raise K2Error(f"agents.tools_min={self.tools_min} and tools_max={self.tools_max} must satisfy 1 <= min <= max",
                          "e.g. tools_min = 2, tools_max = 3")
        return self


def tool_pool(tools: list[Tool], exclude: set[str], size: int, seed: int) -> list[Tool]:
    """The tools training agents use: base tools first, then a seeded sample of the others (size 0 = all)."""
    allowed = [t for t in tools if t.name not in exclude and t.base]
    base = [t for t in allowed if t.origin == "base"]
    rest = [t for t in allowed if t.origin != "base"]
    if size and size < len(allowed):
        rest = random.Random(f"{seed}:pool").sample(rest, max(0, size - len(base)))
    return base + rest


def by_op(tools: list[Tool]) -> dict[str, list[Tool]]:
    out: dict[str, list[Tool]] = {}
    for t in tools:
        out.setdefault(t.base, []).append(t)
    return out


def feasible_templates(ops: set[str]) -> list[Template]:
    return [t for t in TEMPLATES if set(t.ops) <= ops]


def make_agent(rng: random.Random, agent_id: str, template: Template, pool: dict[str, list[Tool]], cfg: AgentConfig, world, *,
               split: str, tool_source: str, unseen: dict[str, list[Tool]] | None = None,
               fits=None) -> tuple[dict, dict[str, Tool]] | None:
    """An agent able to solve `template`, with its tool for each base op. With `unseen`, the tools
    for the template's operations come from that (held-out) pool where it has one. `fits(tools)`
    says whether a tool subset leaves room for a conversation in the token budget: distractors are
    only added while it does, and an agent whose needed tools do not fit is not made (None)."""
    ops = list(dict.fromkeys(template.ops))
    source = unseen if unseen is not None else pool
    if any(op not in source and op not in pool for op in ops):
        return None
    first = source.get(ops[0]) or pool[ops[0]]
    domain = rng.choice(first).domain
    chosen: dict[str, Tool] = {}
    for op in ops:
        cands = source.get(op) or pool.get(op) or []
        same = [t for t in cands if t.domain == domain]
        chosen[op] = rng.choice(same if same and rng.random() < cfg.same_domain else cands)
    if unseen is not None and not any(t in unseen.get(op, []) for op, t in chosen.items()):
        return None
    if fits is not None and not fits(list(chosen.values())):
        return None
    k = max(len(chosen), rng.randint(cfg.tools_min, cfg.tools_max))
    cat = template.category
    distractors = [op for op in pool if op not in chosen and BASE_OPS[op].category == cat]
    rng.shuffle(distractors)
    for op in distractors:
        if len(chosen) >= k:
            break
        cands = pool[op]
        same = [t for t in cands if t.domain == domain]
        pick = rng.choice(same or cands)
        if fits is None or fits(list(chosen.values()) + [pick]):
            chosen[op] = pick
    tools = list(chosen.values())
    rng.shuffle(tools)
    system = system_prompt(rng, rng.choice(ROLES[cat]), rng.choice(world.companies).name)
    agent = {"id": agent_id, "split": split, "tool_source": tool_source, "category": cat, "domain": domain, "system": system,
             "tools": [t.name for t in tools], "primary": template.name,
             "templates": [t.name for t in feasible_templates(set(chosen))]}
    return agent, chosen


def spec_agent(agent_id: str, tool: Tool, others: list[Tool], rng: random.Random, world) -> dict:
    """An agent for a tool known only by its spec (MCP, --tools): that tool plus at most one more of the same server."""
    extra = [t for t in others if t.name != tool.name]
    tools = [tool] + ([rng.choice(extra)] if extra and rng.random() < 0.5 else [])
    rng.shuffle(tools)
    system = system_prompt(rng, "tools assistant", rng.choice(world.companies).name)
    return {"id": agent_id, "split": "train", "tool_source": tool.source, "category": tool.source, "domain": tool.domain,
            "system": system, "tools": [t.name for t in tools], "primary": f"{tool.source}_call", "templates": [f"{tool.source}_call"]}
