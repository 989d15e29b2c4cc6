"""The multi-turn loop: agent (policy) -> parser -> tool executor -> user simulator.

An Episode is a small state machine, so a model policy can advance many episodes in one batch:

    eps = [Episode(...), ...]
    run_episodes(eps, policy)       # while any is active: policy.act(active) -> one assistant turn each
                                    #                      episode.step(turn)

`step` appends the assistant message; its tool calls go to the ToolSimulator (tool messages
come back in order, ids as K2 writes them: functions.<name>:<n>); a turn without calls goes to
the UserSimulator, which either says more (the agent asked, or withheld information) or ends
the episode. Every turn is also checked for well-formedness: the parser found no error, the turn
was finished, and every call names a declared tool with arguments that fit its schema.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from k2cli.agentic.simulators import SimConfig, ToolSimulator, UserSimulator
from k2cli.agentic.tools import Env, Tool, WorldTables
from k2cli.data.chat import ParsedTurn


@dataclass
class Episode:
    task: dict
    agent: dict
    tools: dict[str, Tool]  # the agent's tools, in the agent's order
    env: Env
    user: UserSimulator
    sim: ToolSimulator
    max_turns: int = 8
    messages: list = field(default_factory=list)
    calls: list = field(default_factory=list)  # [{name, arguments, kind, content, id}]
    stats: Counter = field(default_factory=Counter)
    scratch: dict = field(default_factory=dict)  # the policy's memory
    done: bool = False
    failure: str | None = None  # why the episode failed before judging (max_turns, context_exceeded, mcp_error, ...)
    final_reply: str = ""
    n_calls: int = 0

    @property
    def tool_specs(self) -> list[dict]:
        return [t.spec() for t in self.tools.values()]

    def fail(self, reason: str) -> None:
        self.failure = self.failure or reason
        self.done = True

    def turn_well_formed(self, turn: ParsedTurn) -> bool:
        if turn.errors or not turn.finished:
            return False
        return all(c["function"]["name"] in self.tools and self.tools[c["function"]["name"]].check_args(c["function"]["arguments"]) is None
                   for c in turn.tool_calls)

    def step(self, turn: ParsedTurn) -> None:
        if self.done:
            return
        self.stats["turns"] += 1
        ok = self.turn_well_formed(turn)
        self.stats["well_formed_turns"] += ok
        self.stats["parsed_turns"] += not turn.errors and turn.finished
        attempted = bool(turn.tool_calls or turn.errors)
        if attempted:
            self.stats["call_turns"] += 1
            self.stats["call_turns_well_formed"] += ok
        self.messages.append(turn.message())
        if turn.tool_calls:
            for c in turn.tool_calls:
                name, args = c["function"]["name"], c["function"]["arguments"]
                content, kind = self.sim.call(name, args)
                self.calls.append({"id": c["id"], "name": name, "arguments": args, "kind": kind, "content": content})
                self.messages.append({"role": "tool", "tool_call_id": c["id"], "name": name, "content": content})
                self.n_calls += 1
                if kind == "mcp_error":
                    self.fail("mcp_error")
        elif turn.errors:
            self.messages += turn.error_messages()
        else:
            self.final_reply = turn.content
            answer = self.user.respond(turn.content)
            if answer is None:
                self.done = True
                return
            self.messages.append({"role": "user", "content": answer})
        if not self.done and self.stats["turns"] >= self.max_turns:
            self.fail("max_turns")


def new_episode(task: dict, agent: dict, tools: dict[str, Tool], tables: WorldTables, cfg: SimConfig, seed: int,
                max_turns: int, inject: bool = True) -> Episode:
    """A fresh Env, the simulators seeded from (seed, task id), and the opening messages."""
    env = Env(tables)
    rng = random.Random(f"{seed}:episode:{task['id']}")
    agent_tools = {n: tools[n] for n in agent["tools"]}
    ep = Episode(task=task, agent=agent, tools=agent_tools, env=env, user=UserSimulator(task),
                 sim=ToolSimulator(agent_tools, env, cfg, rng, inject=inject), max_turns=max_turns)
    ep.sim.stats = ep.stats  # what the simulator injects is counted per episode (and summed by the caller)
    ep.messages = [{"role": "system", "content": agent["system"]}, {"role": "user", "content": ep.user.opening()}]
    return ep


def run_episodes(episodes: list[Episode], policy, progress=None) -> list[Episode]:
    """Advance every episode until it is done; the policy gets all active episodes at once."""
    active = [e for e in episodes if not e.done]
    while active:
        turns = policy.act(active)
        for ep, turn in zip(active, turns):
            if turn is None:  # the policy could not produce a turn (context full, endpoint failure)
                ep.fail(ep.scratch.get("failure", "policy_error"))
            else:
                ep.step(turn)
            if ep.done and progress is not None:
                progress()
        active = [e for e in active if not e.done]
    return episodes
