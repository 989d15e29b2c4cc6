"""The agent side of an episode: who writes the assistant turns.

    planner         built in, offline (the default): solves a task from its rubric's plan, reading
                    the values it needs from the tool results it actually got — it retries a call
                    that failed transiently or came back partial (once per step), asks the user for
                    withheld information, and answers edge cases (insufficient funds, ...) as the
                    plan says
    k2:<model ref>  a k2 chat model in process: the conversation rendered with the chat template,
                    generated with the latent KV cache for all active episodes in one batch, parsed
                    with `parse_assistant`
    openai          an OpenAI-compatible chat-completions endpoint (the rephrase stage's stdlib
                    client: retries, backoff, response cache), tools sent as OpenAI tools

`policy.act(episodes) -> [ParsedTurn | None]`: one assistant turn per active episode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from k2cli.agentic.tasks import TEMPLATES_BY_NAME, edge_for, fill, reply_values, resolve_arg
from k2cli.data.chat import ParsedTurn, call_id, parse_assistant, render
from k2cli.errors import K2Error

RETRY_KINDS = ("transient", "timeout", "exception", "partial")
GIVE_UP = "Sorry, the service is not responding right now. Please try again later."


@dataclass
class PolicyConfig:
    """Recipe section `policy`: which agent writes the trajectories."""

    name: str = "planner"  # planner | k2:<model ref> | openai
    base_url: str = "http://127.0.0.1:8000/v1"  # openai
    model: str = ""  # openai: the served model's name
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0  # k2 / openai sampling (0 = greedy)
    max_new_tokens: int = 96  # per assistant turn
    batch_size: int = 16  # k2: episodes per generation batch; openai: requests in flight
    max_retries: int = 1  # planner: retries of a failed call per step
    timeout_s: float = 60.0  # openai: per request

    def validate(self) -> "PolicyConfig":
        if self.name not in ("planner", "openai") and not (self.name.startswith("k2:") and len(self.name) > 3):
            raise K2Error(f"unknown agent '{self.name}'", "use planner, k2:<model ref> (e.g. k2:sft:latest) or openai")
        if self.name == "openai" and not self.model:
            raise K2Error("the openai agent needs a model name", "pass --model NAME (and --base-url URL)")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.max_retries < 0:
            raise K2Error("policy.max_new_tokens and batch_size must be >= 1, max_retries >= 0", "fix the policy section")
        return self


def make_policy(cfg: PolicyConfig):
    cfg.validate()
    if cfg.name == "planner":
        return PlannerPolicy(cfg.max_retries)
    if cfg.name == "openai":
        return OpenAIPolicy(cfg)
    return ModelPolicy.from_ref(cfg.name[3:], cfg)


# ----------------------------------------------------------------------------- the built-in planner


class PlannerPolicy:
    name = "planner"

    def __init__(self, max_retries: int = 1):
        self.max_retries = max_retries

    def act(self, episodes) -> list[ParsedTurn]:
        return [self.next_turn(ep) for ep in episodes]

    def _call(self, ep, tool_name: str, args: dict) -> ParsedTurn:
        ep.scratch["pending"] = (tool_name, args)
        return ParsedTurn(content="", tool_calls=[{"id": call_id(tool_name, ep.n_calls), "type": "function",
                                                   "function": {"name": tool_name, "arguments": args}}])

    def next_turn(self, ep) -> ParsedTurn:
        s = ep.scratch
        if "step" not in s:
            s.update(step=0, results=[], retries=0, pending=None)
        plan, slots = ep.task["plan"], ep.task["slots"]
        derive = getattr(TEMPLATES_BY_NAME.get(ep.task["template"]), "derive", None)
        # 1. read what the pending call returned
        if s["pending"] is not None:
            name, args = s["pending"]
            s["pending"] = None
            last = ep.calls[-1]
            try:
                out = json.loads(last["content"])
            except (json.JSONDecodeError, TypeError):
                out = last["content"]
            if last["kind"] in RETRY_KINDS:
                if s["retries"] < self.max_retries:
                    s["retries"] += 1
                    ep.stats["retries"] += 1
                    return self._call(ep, name, args)
                if last["kind"] != "partial":
                    ep.stats["gave_up"] += 1
                    s["gave_up"] = True
                    return ParsedTurn(content=GIVE_UP)
            if last["kind"] in ("error", "unknown") and isinstance(out, dict):
                edge = edge_for(out.get("error", ""), plan["edges"])
                values = reply_values(slots, s["results"], out, derive, quote=plan.get("quote", False))
                if edge is None:
                    return ParsedTurn(content=f"Sorry, that did not work: {out.get('error')}.")
                try:
                    return ParsedTurn(content=fill(plan["edges"][edge]["reply"], values))
                except KeyError:
                    return ParsedTurn(content=f"Sorry, that did not work: {out.get('error')}.")
            tool = ep.tools[name]
            s["results"].append(tool.decode_result(out) if tool.base else {"text": out if isinstance(out, str) else json.dumps(out)})
            s["step"] += 1
            s["retries"] = 0
        # 2. the next step (asking first for what the user has not said yet)
        steps = plan["steps"]
        if s["step"] < len(steps):
            st = steps[s["step"]]
            needed = {m for v in st["args"].values() if isinstance(v, str) for m in _slot_refs(v)}
            for a in plan.get("ask", []):
                if a["slot"] in needed and a["slot"] not in ep.user.revealed:
                    return ParsedTurn(content=a["question"])
            tool = ep.tools[st["tool"]]
            if tool.base:
                args = tool.encode_args({k: resolve_arg(v, slots, s["results"]) for k, v in st["args"].items()})
            else:
                args = dict(st["args"])  # a spec-only tool: the task's literal arguments
            return self._call(ep, st["tool"], args)
        # 3. the answer
        values = reply_values(slots, s["results"], None, derive, quote=plan.get("quote", False))
        values.setdefault("tool", slots.get("tool", ""))
        if "s0_text" in values:
            values["s0_text"] = _short(values["s0_text"])
        return ParsedTurn(content=fill(plan["reply"], values))


def _slot_refs(spec: str) -> list[str]:
    import re

    return re.findall(r"\{(\w+)\}", spec)


def _short(text, n: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


# ----------------------------------------------------------------------------- a k2 model in process


class ModelPolicy:
    name = "k2"

    def __init__(self, model, tokenizer, cfg: PolicyConfig, label: str = "k2"):
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.label = label
        self.context = model.config.max_position_embeddings
        self.stop = tokenizer.stop_ids  # the template's end-of-turn token(s), then end-of-sequence
        self.calls = 0

    @classmethod
    def from_ref(cls, ref: str, cfg: PolicyConfig) -> "ModelPolicy":
        from k2cli.data.tokenizer import has_tokenizer, load_tokenizer
        from k2cli.model.io import load_model

        model, art = load_model(ref)
        if not has_tokenizer(art.path):
            raise K2Error(f"model {art.id} has no tokenizer", "use a model made by k2 pretrain/sft")
        model.eval()
        return cls(model, load_tokenizer(art.path), cfg, label=art.id)

    def act(self, episodes) -> list[ParsedTurn | None]:
        from k2cli.model.generate import generate

        out: list[ParsedTurn | None] = [None] * len(episodes)
        prompts = []
        for i, ep in enumerate(episodes):
            ids = render(self.tok, ep.messages, ep.tool_specs, add_generation_prompt=True).ids
            if len(ids) + 8 > self.context:
                ep.scratch["failure"] = "context_exceeded"
                continue
            prompts.append((len(ids), i, ids))
        prompts.sort()  # similar lengths share a batch: less padding
        for start in range(0, len(prompts), self.cfg.batch_size):
            batch = prompts[start:start + self.cfg.batch_size]
            longest = max(n for n, _, _ in batch)
            new = min(self.cfg.max_new_tokens, self.context - longest)
            gens = generate(self.model, [ids for _, _, ids in batch], max_new_tokens=new, temperature=self.cfg.temperature,
                            stop_ids=self.stop, seed=self.calls)
            self.calls += 1
            for (_, i, _), g in zip(batch, gens):
                out[i] = parse_assistant(self.tok.decode(g))
        return out


# ----------------------------------------------------------------------------- an OpenAI-compatible endpoint


def to_openai_messages(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            out.append({"role": "assistant", "content": m.get("content") or None, "tool_calls": [
                {"id": c["id"], "type": "function", "function": {"name": c["function"]["name"],
                 "arguments": c["function"]["arguments"] if isinstance(c["function"]["arguments"], str)
                 else json.dumps(c["function"]["arguments"])}} for c in m["tool_calls"]]})
        elif m["role"] == "tool":
            out.append({"role": "tool", "tool_call_id": m["tool_call_id"], "content": m["content"]})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    return out


def from_openai_message(msg: dict, first_index: int, finish_reason: str | None = None) -> ParsedTurn:
    """An OpenAI assistant message as a ParsedTurn with K2's call ids (functions.<name>:<n>)."""
    calls, errors = [], []
    for j, c in enumerate(msg.get("tool_calls") or []):
        fn = c.get("function") or {}
        name, raw = fn.get("name") or "", fn.get("arguments")
        try:
            args = json.loads(raw) if isinstance(raw, str) else (raw or {})
        except json.JSONDecodeError as e:
            errors.append(f"arguments of {name} are not valid JSON ({e.msg})")
            continue
        if not isinstance(args, dict):
            errors.append(f"arguments of {name} must be a JSON object")
            continue
        calls.append({"id": call_id(name, first_index + len(calls)), "type": "function", "function": {"name": name, "arguments": args}})
    return ParsedTurn(content=(msg.get("content") or "").strip(), tool_calls=calls, errors=errors, finished=finish_reason != "length")


class OpenAIPolicy:
    name = "openai"

    def __init__(self, cfg: PolicyConfig):
        from k2cli.artifacts import artifacts_root
        from k2cli.data.rephrase.backends import BackendConfig
        from k2cli.data.rephrase.openai_backend import OpenAIBackend

        self.cfg = cfg
        bcfg = BackendConfig(name="openai", base_url=cfg.base_url, model=cfg.model, api_key_env=cfg.api_key_env,
                             temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, concurrency=cfg.batch_size,
                             timeout_s=cfg.timeout_s, embeddings=False)
        self.client = OpenAIBackend(bcfg, cache_dir=artifacts_root() / "cache" / "agentic" / "http")

    def _turn(self, ep) -> ParsedTurn:
        body = {"model": self.cfg.model, "messages": to_openai_messages(ep.messages), "tools": ep.tool_specs,
                "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_new_tokens}
        data = self.client._post("/chat/completions", body)
        try:
            choice = data["choices"][0]
            msg = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise K2Error(f"{self.cfg.base_url}/chat/completions returned no choices[0].message: {str(data)[:200]}",
                          "is --base-url an OpenAI-compatible endpoint?")
        return from_openai_message(msg, ep.n_calls, choice.get("finish_reason"))

    def act(self, episodes) -> list[ParsedTurn]:
        return self.client._parallel(self._turn, list(episodes))
