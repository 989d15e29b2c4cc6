"""The two simulators around the agent: the user and the tools.

UserSimulator   plays the task's persona: opens with what it wants, holds back the information
                the task withholds until the agent asks, and ends the episode once it has nothing
                left to add (an agent question it cannot answer gets one "that is all I know").

ToolSimulator   executes the real implementations on the episode's Env and injects controlled
                stochasticity, drawn from the episode's seed:
                  transient errors   {"error": "service temporarily unavailable, retry"}: nothing
                                     happened, the same call succeeds later (the agent must retry)
                  partial failures   a read returns with one field null and "partial": true
                  timeouts           a call that does not return within timeout_s (or a tool that
                                     raises) becomes a tool error message; the run goes on
                Edge cases (insufficient funds, out of stock, busy, not found) are not injected:
                they are states of the world that tasks are drawn to hit.
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from dataclasses import dataclass

from k2cli.agentic.tools import Env, Tool
from k2cli.errors import K2Error

TRANSIENT = "service temporarily unavailable, retry"


@dataclass
class SimConfig:
    """Recipe section `simulator`."""

    transient_error_rate: float = 0.08  # per synthetic tool call
    partial_failure_rate: float = 0.05  # per read-only synthetic call with 2+ result fields
    timeout_s: float = 5.0  # per call; 0 = no timeout (calls run inline)

    def validate(self) -> "SimConfig":
        if not (0 <= self.transient_error_rate < 1 and 0 <= self.partial_failure_rate < 1 and self.timeout_s >= 0):
            raise K2Error("simulator rates must be in [0, 1) and timeout_s >= 0", "e.g. transient_error_rate = 0.08")
        return self


class ToolTimeout(Exception):
    pass


class McpFailure(Exception):
    """The MCP server behind a tool is gone (did not start, died, or stopped answering)."""


def run_with_timeout(fn, timeout_s: float):
    """fn() in a daemon thread; ToolTimeout if it has not returned after timeout_s (the thread is
    abandoned: Python cannot kill it, but a daemon thread never blocks exit)."""
    if timeout_s <= 0:
        return fn()
    box: dict = {}

    def target():
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["exc"] = e

    th = threading.Thread(target=target, daemon=True, name="k2-tool-call")
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        raise ToolTimeout()
    if "exc" in box:
        raise box["exc"]
    return box["out"]


def as_content(out) -> str:
    return out if isinstance(out, str) else json.dumps(out, ensure_ascii=False)


class ToolSimulator:
    def __init__(self, tools: dict[str, Tool], env: Env, cfg: SimConfig, rng: random.Random, stats: Counter | None = None,
                 inject: bool = True):
        self.tools, self.env, self.cfg, self.rng = tools, env, cfg, rng
        self.stats = stats if stats is not None else Counter()
        self.inject = inject

    def call(self, name: str, args) -> tuple[str, str]:
        """Execute one call: (content of the tool message, kind). Kinds: ok, error (a domain error or
        bad arguments), unknown, transient, partial, timeout, exception, mcp_error."""
        tool = self.tools.get(name)
        if tool is None:
            self.stats["unknown_tool_calls"] += 1
            return as_content({"error": f"unknown tool {name}; available: {', '.join(self.tools)}"}), "unknown"
        synthetic = tool.source == "synthetic"
        if self.inject and synthetic and self.rng.random() < self.cfg.transient_error_rate:
            self.stats["injected_transient_errors"] += 1
            return as_content({"error": TRANSIENT}), "transient"
        try:
            # the built-in operations are trusted, fast Python: inline; anything else (MCP, spec-only,
            # custom runners) runs under the timeout
            timeout = 0 if tool.runner is None and tool.base else self.cfg.timeout_s
            out = run_with_timeout(lambda: tool.execute(self.env, args), timeout)
        except ToolTimeout:
            self.stats["tool_timeouts"] += 1
            return as_content({"error": f"{name} timed out after {self.cfg.timeout_s:g} s"}), "timeout"
        except McpFailure as e:
            self.stats["mcp_errors"] += 1
            return as_content({"error": f"{name}: {e}"}), "mcp_error"
        except Exception as e:  # a tool bug must not end the run: the agent sees it, the stats count it
            self.stats["tool_exceptions"] += 1
            return as_content({"error": f"{name} failed: {type(e).__name__}: {e}"}), "exception"
        if isinstance(out, dict) and "error" in out:
            self.stats["tool_domain_errors"] += 1
            return as_content(out), "error"
        if (self.inject and synthetic and not tool.mutates and self.rng.random() < self.cfg.partial_failure_rate):
            base = tool.decode_result(out)
            if isinstance(base, dict) and len(base) >= 2:
                key = self.rng.choice(sorted(base))
                out = tool.shape_result({**base, key: None})
                out = {**out, "partial": True}
                self.stats["injected_partial_failures"] += 1
                return as_content(out), "partial"
        if tool.source == "mcp":
            self.stats["mcp_calls_ok"] += 1
        return as_content(out), "ok"


class UserSimulator:
    """The task's user: an opening, withheld information revealed when asked, then the end."""

    def __init__(self, task: dict):
        self.task = task
        self.withheld = list(task["user"].get("withheld", []))
        self.revealed: set[str] = set()
        self.nudged = False

    def opening(self) -> str:
        return self.task["user"]["opening"]

    def respond(self, assistant_text: str) -> str | None:
        """The user's next message, or None when the user is done (the episode ends)."""
        for w in self.withheld:
            if w["slot"] not in self.revealed:
                self.revealed.add(w["slot"])
                return w["answer"]
        if assistant_text.strip().endswith("?") and not self.nudged:
            self.nudged = True
            return "That is all I know."
        return None
