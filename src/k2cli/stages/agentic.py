"""`k2 agentic DATASET`: synthetic tool-use trajectories (K2 section 3.1.1), judged and filtered.

    world.json of a `k2 data synth` dataset
      -> tools: categories -> application domains -> tools -> evolved variants (1,000+, all validated),
         plus real MCP tools (--mcp "COMMAND ARGS") and spec-only tools (--tools FILE)
      -> agents: a system prompt + a small tool subset each (seeded diversity)
      -> tasks with rubrics: single calls to multi-step plans with dependencies; train and held out
         (held out: new draws with seen tools, and tasks on tools no training agent had)
      -> episodes: agent (planner | k2:<model> | openai) <-> tool simulator (real implementations,
         transient errors, partial failures, timeouts) <-> user simulator (persona, withheld info)
      -> judge: replayed-state hash, state assertions, reply facts, checkpoints (+ optional model judge);
         only passing trajectories that fit the token budget are kept, rejections counted by reason
      -> a dataset artifact: chat/, tools.json, agents.jsonl, tasks.jsonl, world.json, summary.md
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field

import rich_click as click

from k2cli.agentic.agents import AgentConfig
from k2cli.agentic.episode import new_episode, run_episodes
from k2cli.agentic.judge import JudgeConfig, ModelJudge, judge_episode
from k2cli.agentic.policies import PlannerPolicy, PolicyConfig, make_policy
from k2cli.agentic.simulators import McpFailure, SimConfig
from k2cli.agentic.synthesis import TaskConfig, TokenCounter, plan_tasks
from k2cli.agentic.toolgen import ToolGenConfig, generate_tools
from k2cli.agentic.tools import WorldTables, echo_runner, external_tool, load_external_specs
from k2cli.artifacts import open_artifact
from k2cli.commands.common import recipe_options, run_options
from k2cli.console import err, info, quiet
from k2cli.data.synth import save_dataset
from k2cli.data.world import WORLD_FILE, load_world
from k2cli.errors import K2Error
from k2cli.stages.runner import RunOptions, Stage


@dataclass
class EpisodeConfig:
    max_turns: int = 8  # assistant turns per episode
    max_tokens: int = 512  # trajectories longer than this (chat template, tool declarations included) are rejected; 0 = no limit
    tokenizer: str = ""  # a model/tokenizer artifact to count tokens exactly; "" = a conservative estimate
    attempts: int = 1  # rollouts per training task (rejection sampling: those that pass are kept)


@dataclass
class McpConfig:
    command: str = ""  # the command line of a stdio MCP server ("" = none)
    tasks_per_tool: int = 3
    timeout_s: float = 10.0  # per call
    start_timeout_s: float = 30.0


@dataclass
class AgenticRecipe:
    seed: int = 0
    input: str = "synth:latest"  # a dataset with world.json
    tools: ToolGenConfig = field(default_factory=ToolGenConfig)
    agents: AgentConfig = field(default_factory=AgentConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    simulator: SimConfig = field(default_factory=SimConfig)
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    mcp: McpConfig = field(default_factory=McpConfig)
    external_tools: str = ""  # a JSON file of extra tool specs (OpenAI or MCP shape), executed by the tool simulator

    def validate(self) -> "AgenticRecipe":
        if self.episode.max_turns < 1 or self.episode.attempts < 1 or self.episode.max_tokens < 0:
            raise K2Error("episode.max_turns and episode.attempts must be >= 1, max_tokens >= 0", "e.g. max_turns = 8")
        return self


class Progress:
    """episodes done / total, episodes/s, kept / rejected (a live bar on a terminal)."""

    def __init__(self, total: int, title: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

        self.total, self.done, self.t0 = total, 0, time.time()
        self.live = not quiet() and err.is_terminal
        self.bar = None
        if self.live:
            self.bar = RichProgress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[rate]} episodes/s"), TimeRemainingColumn(), console=err)
            self.task = self.bar.add_task(title, total=total, rate="-")
            self.bar.start()

    def __call__(self):
        self.done += 1
        if self.bar is not None:
            rate = self.done / max(time.time() - self.t0, 1e-9)
            self.bar.update(self.task, completed=self.done, rate=f"{rate:,.0f}")

    def close(self):
        if self.bar is not None:
            self.bar.stop()


def _summary(m: dict, recipe: AgenticRecipe, reasons: Counter, token_how: str, kept_rows: list[dict]) -> str:
    lines = ["# agentic tool-use data", "",
             f"- tools: {m['tools_total']} ({m['tools_synthetic']} synthetic over {m['tool_categories']} categories and "
             f"{m['tool_domains']} application domains, {m['tools_evolved']} of them evolved variants; {m['tools_mcp']} MCP; "
             f"{m['tools_external']} from --tools); {m['tools_heldout']} held out of training",
             f"- agents: {m['agents_train']} training, {m['agents_test']} evaluation; {recipe.agents.tools_min}-{recipe.agents.tools_max} tools each",
             f"- tasks: {m['tasks_train']} training, {m['tasks_test']} held out ({m['tasks_test_seen']} with seen tools, "
             f"{m['tasks_test_unseen']} with unseen tools; {m.get('tasks_test_dropped_too_long', 0)} drawn over the token budget were dropped)",
             f"- trajectories ({recipe.policy.name}): {m['trajectories']} run, **{m['kept']} kept**, {m['rejected']} rejected"
             + (": " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()) if reasons else ""),
             f"- simulator: {m.get('injected_transient_errors', 0)} transient errors and {m.get('injected_partial_failures', 0)} partial "
             f"failures injected, {m.get('retries', 0)} retries, {m.get('tool_timeouts', 0)} timeouts, {m.get('tool_exceptions', 0)} tool exceptions",
             f"- tokens per kept trajectory ({token_how}): mean {m['tokens_mean']}, max {m['tokens_max']} (budget {recipe.episode.max_tokens or 'none'})",
             f"- the planner solves {m['planner_test_success']:.0%} of the held-out tasks (a check that they are solvable)",
             "- kept by task template: " + ", ".join(f"{k} {v}" for k, v in Counter(r["template"] for r in kept_rows).most_common()),
             "- kept by number of tool calls: " + ", ".join(f"{k}: {v}" for k, v in sorted(Counter(r["tool_calls"] for r in kept_rows).items())),
             ""]
    if m.get("mcp_error"):
        lines.insert(-1, f"- MCP: {m['mcp_error']}")
    return "\n".join(lines)


def _row(ep, tokens: int) -> dict:
    return {"messages": json.dumps(ep.messages, ensure_ascii=False), "tools": json.dumps(ep.tool_specs, ensure_ascii=False),
            "task_id": ep.task["id"], "agent_id": ep.agent["id"], "domain": ep.task["category"], "app_domain": ep.task["domain"],
            "template": ep.task["template"], "tool_source": ep.task["tool_source"], "turns": ep.stats["turns"],
            "tool_calls": ep.n_calls, "tokens": tokens}


def run(recipe: AgenticRecipe, opts: RunOptions = RunOptions()):
    with Stage("agentic", "dataset", recipe, opts) as st:
        t0 = time.time()
        data_art = open_artifact(recipe.input, kind="dataset")
        counter = TokenCounter(recipe.episode.tokenizer)
        if done := st.up_to_date([data_art, counter.art]):
            return done
        world = load_world(recipe.input)
        tables = WorldTables(world, recipe.seed)
        toolset = generate_tools(recipe.tools, recipe.seed)
        stats: Counter = Counter()
        # --- tools known only by their spec: --tools FILE, --mcp
        spec_tools = []
        if recipe.external_tools:
            spec_tools += [external_tool(s, "external", echo_runner(s["function"]["name"])) for s in load_external_specs(recipe.external_tools)]
        server, mcp_error, mcp_invalid = None, "", []
        try:
            if recipe.mcp.command:
                from k2cli.agentic.mcp_tools import McpServer

                server = McpServer(recipe.mcp.command, recipe.mcp.timeout_s, recipe.mcp.start_timeout_s)
                try:
                    server.start()
                    spec_tools += server.tools()
                    mcp_invalid = server.invalid
                    for problem in mcp_invalid:
                        info(f"[yellow]skipped an MCP tool[/]: {problem}")
                    info(f"mcp: {len(server.specs)} tools from '{recipe.mcp.command}'")
                except McpFailure as e:
                    mcp_error = str(e)
                    info(f"[yellow]mcp: {mcp_error}; going on without MCP tools[/]")
            names = {t.name for t in toolset.tools}
            for t in spec_tools:
                if t.name in names:
                    raise K2Error(f"tool name '{t.name}' ({t.source}) clashes with another tool", "rename the tool")
                names.add(t.name)
            plan = plan_tasks(toolset.tools, toolset.heldout, tables, recipe.agents, recipe.tasks, recipe.seed, spec_tools,
                              recipe.mcp.tasks_per_tool, fits=counter.fits(recipe.episode.max_tokens))
            agents = {a["id"]: a for a in plan.agents}
            train_tasks = [t for t in plan.tasks if t["split"] == "train"]
            test_tasks = [t for t in plan.tasks if t["split"] == "test"]
            # --- trajectories
            policy = make_policy(recipe.policy)
            episodes = [new_episode(task, agents[task["agent_id"]], plan.tools, tables, recipe.simulator, recipe.seed + k,
                                    recipe.episode.max_turns) for k in range(recipe.episode.attempts) for task in train_tasks]
            bar = Progress(len(episodes), "agentic")
            try:
                run_episodes(episodes, policy, progress=bar)
            finally:
                bar.close()
            reasons: Counter = Counter()
            passed, kept_rows, tokens = [], [], []
            for ep in episodes:
                stats.update(ep.stats)
                v = judge_episode(ep, tables, plan.tools)
                if not v.keep:
                    reasons[v.reason] += 1
                    continue
                n = counter(ep.messages, ep.tool_specs)
                if recipe.episode.max_tokens and n > recipe.episode.max_tokens:
                    reasons["too_long"] += 1
                    continue
                passed.append((ep, n))
            if recipe.judge.backend and passed:
                verdicts = ModelJudge(recipe.judge)([ep for ep, _ in passed])
                reasons["model_judge"] += sum(not ok for ok in verdicts)
                passed = [p for p, ok in zip(passed, verdicts) if ok]
            seen_kept = set()
            for ep, n in passed:
                kept_rows.append(_row(ep, n))
                tokens.append(n)
                seen_kept.update(ep.tools)
            # --- held-out tasks: solvable (the planner, no stochasticity), within the token budget, really unseen?
            check = [new_episode(task, agents[task["agent_id"]], plan.tools, tables, recipe.simulator, recipe.seed, recipe.episode.max_turns,
                                 inject=False) for task in test_tasks]
            run_episodes(check, PlannerPolicy())
            solved, kept_test, dropped_test = 0, [], Counter()
            for ep in check:
                ok = judge_episode(ep, tables, plan.tools).success
                solved += ok
                n = counter(ep.messages, ep.tool_specs)
                ep.task["rubric"]["tokens"] = n
                if not ok:
                    dropped_test["unsolvable"] += 1
                elif recipe.episode.max_tokens and n > recipe.episode.max_tokens:
                    dropped_test["too_long"] += 1
                else:
                    kept_test.append(ep.task)
            planner_test_success = solved / max(1, len(test_tasks))
            for task in kept_test:
                needed = {s["tool"] for s in task["plan"]["steps"]}
                task["tool_source"] = "seen" if needed <= seen_kept else "unseen"
            test_ids = {t["id"] for t in kept_test}
            plan.tasks = [t for t in plan.tasks if t["split"] == "train" or t["id"] in test_ids]
            test_tasks = kept_test
            if not kept_rows:
                raise K2Error(f"no trajectory passed the judge ({dict(reasons)})",
                              "check the recipe: a larger episode.max_tokens, fewer tools per agent, or another agent")
        finally:
            if server is not None:
                server.close()
        mcp_tools = [t for t in spec_tools if t.source == "mcp"]
        mcp_kept = sum(r["tool_source"] == "mcp" for r in kept_rows)
        with st.writer() as w:
            save_dataset(kept_rows, w.dir / "chat")
            all_tools = [dict(t.to_dict(), split="heldout" if t.name in toolset.heldout else "train") for t in toolset.tools]
            all_tools += [dict(t.to_dict(), split="train") for t in spec_tools]
            (w.dir / "tools.json").write_text(json.dumps({"count": len(all_tools), "tools": all_tools}, ensure_ascii=False) + "\n")
            (w.dir / "agents.jsonl").write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in plan.agents))
            (w.dir / "tasks.jsonl").write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in plan.tasks))
            shutil.copyfile(data_art.file(WORLD_FILE), w.dir / WORLD_FILE)
            n_test_seen = sum(t["tool_source"] == "seen" for t in test_tasks)
            m = {
                "tools_total": len(all_tools), **toolset.stats, "tools_mcp": len(mcp_tools),
                "tools_external": sum(t.source == "external" for t in spec_tools), "tools_mcp_invalid": len(mcp_invalid),
                "agents_train": sum(a["split"] == "train" for a in plan.agents), "agents_test": sum(a["split"] == "test" for a in plan.agents),
                "tasks_train": len(train_tasks), "tasks_test": len(test_tasks), "tasks_test_seen": n_test_seen,
                "tasks_test_unseen": len(test_tasks) - n_test_seen, "trajectories": len(episodes), "kept": len(kept_rows),
                "rejected": len(episodes) - len(kept_rows), **{f"rejected_{k}": v for k, v in sorted(reasons.items())},
                "kept_mcp": mcp_kept, "mcp_error": mcp_error,
                **{k: v for k, v in sorted(stats.items()) if k not in ("turns", "well_formed_turns", "call_turns", "call_turns_well_formed")},
                "tool_calls": sum(ep.n_calls for ep in episodes), "avg_turns_kept": round(sum(r["turns"] for r in kept_rows) / len(kept_rows), 3),
                "tokens_mean": round(sum(tokens) / len(tokens), 1), "tokens_max": max(tokens), "tokens_counted": counter.how,
                "planner_test_success": planner_test_success, **{f"tasks_test_dropped_{k}": v for k, v in sorted(dropped_test.items())},
                "policy": recipe.policy.name,
                "wall_s": round(time.time() - t0, 1),
            }
            w.metrics = m
            (w.dir / "summary.md").write_text(_summary(m, recipe, reasons, counter.how, kept_rows))
            art = w.commit(summary=f"{m['tools_total']} tools, {m['agents_train']}+{m['agents_test']} agents, "
                                   f"{m['tasks_train']}+{m['tasks_test']} tasks, {m['kept']}/{m['trajectories']} trajectories kept")
        info(f"[green]wrote[/] {art.path} ({art.id}): {m['tools_total']} tools, {m['kept']} kept / {m['rejected']} rejected "
             f"({', '.join(f'{k} {v}' for k, v in reasons.most_common()) or 'none'}), {m['wall_s']} s")
        return art


@click.command("agentic")
@click.argument("dataset", required=False)
@recipe_options("agentic", AgenticRecipe)
@click.option("--agent", default=None, metavar="NAME", help="Who acts: planner (default), k2:MODEL_REF (e.g. k2:sft:latest), or openai.")
@click.option("--base-url", default=None, help="OpenAI-compatible endpoint for --agent openai (policy.base_url).")
@click.option("--model", "model_name", default=None, help="Model name for --agent openai (policy.model).")
@click.option("--mcp", "mcp_command", default=None, metavar='"COMMAND ARGS"', help="Start this stdio MCP server and use its tools.")
@click.option("--tools", "tools_file", default=None, metavar="FILE", help="Extra tool specs (JSON list, OpenAI or MCP shape).")
@click.option("--judge", "judge_backend", default=None, metavar="NAME", help="Also ask a model judge: k2:MODEL_REF or openai.")
@click.option("--tokenizer", default=None, metavar="REF", help="Count tokens with this model/tokenizer artifact (episode.tokenizer).")
@run_options()
def agentic_cmd(dataset, recipe, recipe_source, agent, base_url, model_name, mcp_command, tools_file, judge_backend, tokenizer, opts):
    """Synthesise tool-use trajectories over the world of DATASET (default: the recipe's `input`):
    1,000+ tools, agents, tasks with rubrics, simulated multi-turn episodes, judged and filtered.
    """
    r = recipe
    if dataset:
        r = dataclasses.replace(r, input=dataset)
    policy = dataclasses.replace(r.policy, **{k: v for k, v in (("name", agent), ("base_url", base_url), ("model", model_name)) if v})
    judge = dataclasses.replace(r.judge, **{k: v for k, v in (("backend", judge_backend), ("base_url", base_url),
                                                                ("model", model_name)) if v})
    mcp = dataclasses.replace(r.mcp, command=mcp_command) if mcp_command else r.mcp
    episode = dataclasses.replace(r.episode, tokenizer=tokenizer) if tokenizer else r.episode
    r = dataclasses.replace(r, policy=policy, judge=judge, mcp=mcp, episode=episode,
                            external_tools=tools_file if tools_file else r.external_tools)
    run(r, opts)


COMMANDS = [agentic_cmd]
