"""The tools environment: the agentic issue's tasks, multi-turn, rewarded by their rubrics.

Each problem is a task of an agentic dataset (`k2 agentic`: tasks.jsonl, agents.jsonl, tools.json,
world.json): its agent's system prompt and tools, the user simulator's opening. A step feeds the
model's turn to the same Episode state machine the data synthesis used (agentic/episode.py): tool
calls are executed on the episode's Env and answered with tool messages, a reply without calls
goes to the user simulator, which asks for more or ends the episode. At the end the task's rubric
judges the trajectory (agentic/judge.py, tau-bench style: final state, assertions, facts in the
reply): reward 1 for success, else 0. Tool errors are not injected (SimConfig rates 0), so the
reward measures the policy, and K samples of one task face the same tools.
"""

from __future__ import annotations

from k2cli.data.chat import parse_assistant
from k2cli.rl.env import Environment, Observation, WorldData, register


@register
class ToolEnv(Environment):
    name = "tools"
    description = "multi-turn tool-use tasks of the agentic dataset, judged by their rubrics (state, assertions, reply facts)"
    default_budget = 192
    task_rubric = "Completes the user's task with the right tool calls and states the result."

    @classmethod
    def load(cls, data: WorldData, cfg):
        from k2cli.agentic.synthesis import load_environment

        env = load_environment(data.agentic)

        def usable(t):
            agent = env.agents.get(t["agent_id"])
            return agent is not None and all(n in env.tools for n in agent["tools"])

        train = [{"task": t, "prompt": t["user"]["opening"]} for t in env.tasks if t["split"] == "train" and usable(t)]
        test = [{"task": t, "prompt": t["user"]["opening"]} for t in env.tasks if t["split"] == "test" and usable(t)]
        return train[: cfg.train_size], test[: cfg.test_size], {"env": env, "max_turns": cfg.tool_turns}

    def reset(self, seed: int, index: int | None = None) -> Observation:
        from k2cli.agentic.episode import new_episode
        from k2cli.agentic.simulators import SimConfig

        super().reset(seed, index)
        env, task = self.shared["env"], self.problem["task"]
        self.episode = new_episode(task, env.agents[task["agent_id"]], env.tools, env.tables,
                                   SimConfig(transient_error_rate=0.0, partial_failure_rate=0.0), seed, self.shared["max_turns"],
                                   inject=False)
        self.messages = self.episode.messages
        return Observation(list(self.messages), self.tools())

    def opening(self, problem):
        return []  # reset() builds the episode, whose opening messages are the observation

    def tools(self):
        return self.episode.tool_specs if getattr(self, "episode", None) else None

    def step(self, text: str):
        from k2cli.agentic.judge import judge_episode

        ep = self.episode
        ep.step(parse_assistant(text))
        obs = Observation(list(ep.messages), self.tools())
        if not ep.done:
            return obs, 0.0, False, {}
        env = self.shared["env"]
        verdict = judge_episode(ep, env.tables, env.tools)
        return obs, float(verdict.success), True, {"correct": verdict.success, "reason": verdict.reason,
                                                   "turns": ep.stats["turns"]}
