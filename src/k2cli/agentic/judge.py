"""Judging a trajectory against its task's rubric (tau-bench style), plus an optional model judge.

Execution-based checks, in the order a failure is reported:
    <episode failure>     max_turns, context_exceeded, mcp_error, policy_error (set by the loop)
    invalid_conversation  roles out of order (`validate_conversation`)
    state_mismatch        the episode's final state hash differs from the hash of the rubric's
                          expected actions replayed on a fresh Env
    assertion_failed      a state assertion of the rubric does not hold
    reply_missing_facts   the final reply lacks a fact the rubric requires (for spec-only tools:
                          the text the tool returned)
    checkpoint_missed     an expected call did not happen successfully, in order (the expected
                          tool-use pattern); data filtering requires it, task success does not
    unrecovered_tool_error  any of the above, after the agent gave up on a call that kept failing
A model judge (k2:<ref> or openai, through the rephrase backends) can veto what passed:
`model_judge`.

Task success (the evaluation's number) is tau-bench's: no failure, state, assertions, reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from k2cli.agentic.tasks import lookup_path
from k2cli.agentic.tools import Env, Tool, WorldTables
from k2cli.data.chat import validate_conversation
from k2cli.errors import K2Error

REASONS = ("max_turns", "context_exceeded", "mcp_error", "policy_error", "unrecovered_tool_error", "invalid_conversation", "state_mismatch",
           "assertion_failed", "reply_missing_facts", "checkpoint_missed", "too_long", "model_judge")


@dataclass
class Verdict:
    success: bool  # the task is solved (state + assertions + reply)
    keep: bool  # the trajectory may be training data (success + roles + checkpoints)
    reason: str | None  # the first failed check
    checks: dict = field(default_factory=dict)


def replay_hash(actions: list[dict], tools: dict[str, Tool], tables: WorldTables) -> str:
    env = Env(tables)
    for a in actions:
        tools[a["name"]].execute(env, a["arguments"])
    return env.hash()


def _norm(tool: Tool | None, args) -> dict:
    if not isinstance(args, dict):
        return {}
    base = tool.to_base_args(args) if tool is not None and tool.base else dict(args)
    return {k: (v.strip().lower() if isinstance(v, str) else float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
            for k, v in base.items()}


def checkpoints_hit(expected: list[dict], calls: list[dict], tools: dict[str, Tool]) -> int:
    """How many expected calls happened successfully, in order (a subsequence of the calls)."""
    ok = [c for c in calls if c["kind"] in ("ok", "error", "partial")]  # a planned edge case answers with a domain error
    i = 0
    for c in ok:
        if i < len(expected) and c["name"] == expected[i]["name"] and \
                _norm(tools.get(c["name"]), c["arguments"]) == _norm(tools.get(c["name"]), expected[i]["arguments"]):
            i += 1
    return i


def judge_episode(ep, tables: WorldTables, all_tools: dict[str, Tool] | None = None) -> Verdict:
    rubric = ep.task["rubric"]
    tools = all_tools or ep.tools
    checks: dict = {}
    if ep.failure:
        return Verdict(False, False, ep.failure, checks)
    try:
        validate_conversation(ep.messages)
        checks["roles"] = True
    except K2Error:
        checks["roles"] = False
    if rubric.get("state_hash") is not None:
        expected = replay_hash(rubric["actions"], tools, tables)
        checks["state"] = ep.env.hash() == expected
    else:
        checks["state"] = True
    state = ep.env.state()
    checks["assertions"] = all(lookup_path(state, a["path"]) == a["equals"] for a in rubric.get("assertions", []))
    reply = ep.final_reply.lower()
    facts = [str(f).lower() for f in rubric.get("reply_contains", [])]
    if rubric.get("reply_contains_result"):
        got = next((c["content"] for c in ep.calls if c["kind"] == "ok" and c["name"] == rubric["actions"][0]["name"]), None)
        facts.append(" ".join(str(got).split())[:40].lower() if got is not None else "\0never returned")
    checks["reply"] = bool(reply) and all(f in reply for f in facts)
    hit = checkpoints_hit(rubric.get("checkpoints", []), ep.calls, tools)
    checks["checkpoints"] = hit / max(1, len(rubric.get("checkpoints", [])))
    success = checks["state"] and checks["assertions"] and checks["reply"]
    order = [("invalid_conversation", checks["roles"]), ("state_mismatch", checks["state"]),
             ("assertion_failed", checks["assertions"]), ("reply_missing_facts", checks["reply"]),
             ("checkpoint_missed", checks["checkpoints"] == 1.0)]
    reason = next((r for r, ok in order if not ok), None)
    if reason and ep.stats.get("gave_up"):
        reason = "unrecovered_tool_error"  # the agent stopped after a call kept failing
    return Verdict(success, reason is None, reason, checks)


# ----------------------------------------------------------------------------- an optional model judge


@dataclass
class JudgeConfig:
    """Recipe section `judge`."""

    backend: str = ""  # "" = execution checks only; k2:<model ref> or openai = also ask a model
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""
    max_new_tokens: int = 8


def transcript(messages: list[dict], limit: int = 3000) -> str:
    lines = []
    for m in messages:
        if m["role"] == "system":
            continue
        text = m.get("content") or ""
        if m.get("tool_calls"):
            text += " " + "; ".join(f"call {c['function']['name']}({c['function']['arguments']})" for c in m["tool_calls"])
        lines.append(f"{m['role']}: {text.strip()}")
    out = "\n".join(lines)
    return out[-limit:]


class ModelJudge:
    """Asks a model whether the assistant completed the task (YES/NO), through the rephrase backends."""

    def __init__(self, cfg: JudgeConfig):
        from k2cli.data.rephrase.backends import BackendConfig, backend_kind, make_backend

        if backend_kind(cfg.backend) == "builtin":
            raise K2Error("the model judge needs a model", "set judge.backend to k2:<model ref> or openai (or leave it empty)")
        self.backend = make_backend(BackendConfig(name=cfg.backend, base_url=cfg.base_url, model=cfg.model, temperature=0.0,
                                                  max_new_tokens=cfg.max_new_tokens, embeddings=False))

    def __call__(self, episodes) -> list[bool]:
        from k2cli.data.rephrase.backends import RewriteRequest

        reqs = []
        for i, ep in enumerate(episodes):
            msgs = [{"role": "system", "content": "You judge whether an assistant completed a user's task. Answer YES or NO."},
                    {"role": "user", "content": f"Task: {ep.task['user']['opening']}\nSuccess criteria: {ep.task['rubric']['success']}\n"
                                                f"Conversation:\n{transcript(ep.messages)}\nDid the assistant complete the task?"}]
            reqs.append(RewriteRequest(messages=msgs, style="judge", kind="judge", chunk="", context="", seed=i, doc_id=ep.task["id"]))
        return ["yes" in t.strip().lower()[:16] for t in self.backend.rewrite(reqs)] if reqs else []
