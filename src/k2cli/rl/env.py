"""The environment API: Gym-like, multi-turn capable, over the synthetic world.

    env = pool.make("train")                     # a fresh episode object over the pool's problems
    obs = env.reset(seed, index=None)            # Observation(messages, tools): what the model sees
    obs, reward, done, info = env.step(text)     # text: what the model wrote after the assistant header

A single-turn environment (math, logic, instruct, code, chat) is done after one step; a
multi-turn one (tools) answers with tool results or a user reply until the episode ends. The
reward comes with the last step. Single-turn environments declare no tools, so a reply with
tool calls or chat-format markup in it is malformed and scores 0 before any verifier runs (a
small model otherwise earns "no commas" or "lowercase" with tool-call debris).

`verifiable = False` marks an environment without a checkable answer (chat): its reward is the
self-critique rubric reward (rl/critic.py), computed by the task from the critic's pairwise
judgements of the rollouts, and `step` returns 0 there.

A `Pool` is one environment's problems, split into train (rollouts) and test (held-out
rewards), plus its per-task token budget. Pools are built by `build_pools` from the datasets in
the model's lineage: the synthetic world (world.json, math/) and, for tools, an agentic dataset.
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass, field

from k2cli import lineage
from k2cli.data.chat import ParsedTurn, parse_assistant
from k2cli.errors import K2Error


@dataclass
class Observation:
    messages: list[dict]  # the conversation so far (OpenAI/TRL shape)
    tools: list[dict] | None = None  # tool schemas the model may call (OpenAI function format)


class Environment:
    """Base class. Subclasses set `name`, `default_budget`, and implement `load`, `opening`, `score`."""

    name = ""
    description = ""
    verifiable = True
    default_budget = 64  # max tokens the policy may write per episode (all its turns together)
    task_rubric = ""  # the per-task rubric the critic reads, unless a problem has its own "rubric"

    def __init__(self, problems: list[dict], shared=None):
        if not problems:
            raise K2Error(f"the {self.name} environment has no problems", "check its data and the prompt selection")
        self.problems = problems
        self.shared = shared  # heavy read-only state shared by every episode (the tools env's world tables)
        self.problem: dict | None = None
        self.index = -1
        self.messages: list[dict] = []

    # ---- Gym-like API
    def reset(self, seed: int, index: int | None = None) -> Observation:
        """Start an episode on problem `index` (or one drawn with `seed`)."""
        self.index = index if index is not None else random.Random(f"{seed}:{self.name}").randrange(len(self.problems))
        self.problem = self.problems[self.index]
        self.messages = self.opening(self.problem)
        return Observation(list(self.messages), self.tools())

    def step(self, text: str) -> tuple[Observation, float, bool, dict]:
        """One model turn. Single-turn environments score it and finish. A reply must be plain text:
        tool calls (no tools are declared here) or chat-format markup in it score 0."""
        turn = parse_assistant(text)
        self.messages.append(turn.message())
        if turn.tool_calls or turn.errors or "<|" in turn.content:
            return Observation(list(self.messages), self.tools()), 0.0, True, {"correct": False if self.verifiable else None,
                                                                                "malformed": True}
        reward, info = self.score(self.problem, turn)
        return Observation(list(self.messages), self.tools()), reward, True, info

    # ---- what a subclass provides
    @classmethod
    def load(cls, data: "WorldData", cfg) -> tuple[list[dict], list[dict], object]:
        """(train problems, test problems, shared state) from the datasets."""
        raise NotImplementedError

    def opening(self, problem: dict) -> list[dict]:
        return [{"role": "user", "content": problem["prompt"]}]

    def tools(self) -> list[dict] | None:
        return None

    def rubric(self) -> str:
        return (self.problem or {}).get("rubric") or self.task_rubric

    def score(self, problem: dict, turn: ParsedTurn) -> tuple[float, dict]:
        """(reward, info) of a finished turn; info["correct"] says whether it solved the problem."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- registry

ENVIRONMENTS: dict[str, type[Environment]] = {}
MODULES = ("k2cli.rl.world_envs", "k2cli.rl.code_env", "k2cli.rl.tool_env")


def register(cls):
    ENVIRONMENTS[cls.name] = cls
    return cls


def registry() -> dict[str, type[Environment]]:
    for m in MODULES:  # environments register themselves on import
        importlib.import_module(m)
    return ENVIRONMENTS


def env_class(name: str) -> type[Environment]:
    envs = registry()
    if name not in envs:
        from k2cli.errors import closest

        best = closest(name, envs)
        hint = (f"did you mean '{best}'? " if best else "") + "valid: " + ", ".join(sorted(envs))
        raise K2Error(f"unknown RL environment '{name}'", hint)
    return envs[name]


# ----------------------------------------------------------------------------- data and pools


@dataclass
class WorldData:
    """What the environments are built from."""

    world: object  # k2cli.data.world.World
    math: list[dict]  # rows of the dataset's math/ (problem, answer, split)
    seed: int  # the world's seed: problem pools depend on the data only, never on a stage's seed
    dataset: object = None  # the world dataset Artifact
    agentic: object = None  # an agentic dataset Artifact (tools env), or None


@dataclass
class Pool:
    name: str
    env: type[Environment]
    train: list[dict]
    test: list[dict]
    budget: int
    shared: object = None
    dropped_long: int = 0  # problems whose prompt + budget does not fit the context

    def make(self, split: str = "train") -> Environment:
        return self.env(self.train if split == "train" else self.test, self.shared)


@dataclass
class EnvConfig:
    """Recipe section `envs`: which environments, how much of each, how big."""

    mix: dict[str, float] = field(default_factory=lambda: {"math": 1.0, "logic": 1.0, "instruct": 1.0, "chat": 0.5})
    budget: dict[str, int] = field(default_factory=dict)  # max policy tokens per episode; missing = the env's default
    train_size: int = 400  # generated problems per environment for rollouts (math: plus the dataset's train split)
    test_size: int = 100  # generated held-out problems per environment (math: plus the dataset's test split)
    tool_turns: int = 4  # tools: max assistant turns per episode
    data: str = ""  # the synthetic-world dataset; "" = the nearest one in the model's lineage
    agentic: str = ""  # the agentic dataset (tools env); "" = the nearest one in the lineage
    unsafe_sandbox: bool = False  # code env: run model-written code where the OS offers no isolation (--unsafe-sandbox)

    def validate(self) -> None:
        for name in list(self.mix) + list(self.budget):
            env_class(name)
        if any(w < 0 for w in self.mix.values()) or not any(w > 0 for w in self.mix.values()):
            raise K2Error("envs.mix needs non-negative weights and at least one above 0", "e.g. --set envs.mix={math=1.0}")
        if any(b < 1 for b in self.budget.values()):
            raise K2Error("every envs.budget must be >= 1 token", "e.g. --set envs.budget={math=96}")
        if self.train_size < 1 or self.test_size < 1:
            raise K2Error("envs.train_size and envs.test_size must be >= 1", "e.g. train_size = 400")

    def budget_for(self, name: str) -> int:
        return self.budget.get(name, env_class(name).default_budget)


def find_agentic(model_art, ref: str = ""):
    """The agentic dataset of the tools environment: `ref` (envs.agentic), else the nearest in the lineage."""
    return lineage.dataset(model_art, "tasks.jsonl", "tools.json", ref=ref, key="envs.agentic")


def load_world_data(model_art, cfg: EnvConfig, need_agentic: bool = False) -> WorldData:
    """The world dataset (world.json) and, if asked, the agentic dataset, from the lineage or the recipe."""
    from k2cli.data.loading import load_part
    from k2cli.data.world import load_world

    art = lineage.dataset(model_art, "world.json", ref=cfg.data, key="envs.data")
    if art is None:
        raise K2Error(f"no synthetic-world dataset (world.json) in the lineage of {model_art.id}",
                      "set envs.data to a 'k2 data synth' artifact")
    art.check("world.json")
    math_rows = [dict(r) for r in load_part(art, "math")] if art.has("math") else []  # verified first
    agentic = find_agentic(model_art, cfg.agentic) if need_agentic else None
    if need_agentic and agentic is None:
        raise K2Error(f"the tools environment needs an agentic dataset; none in the lineage of {model_art.id}",
                      "set envs.agentic to a 'k2 agentic' artifact, or set envs.mix.tools=0")
    world = load_world(str(art.file("world.json")))
    return WorldData(world, math_rows, world.seed, art, agentic)


def build_pools(data: WorldData, cfg: EnvConfig, names: list[str], tokenizer, seq_len: int) -> dict[str, Pool]:
    """One Pool per environment; problems whose rendered prompt leaves no room for the budget are dropped."""
    from k2cli.data.chat import render

    pools = {}
    for name in names:
        cls = env_class(name)
        budget = cfg.budget_for(name)
        if budget >= seq_len:
            raise K2Error(f"envs.budget.{name}={budget} tokens does not fit the {seq_len}-token context (train.seq_len)",
                          f"lower envs.budget.{name} or raise train.seq_len")
        train, test, shared = cls.load(data, cfg)
        pool = Pool(name, cls, [], [], budget, shared)
        for split, problems in (("train", train), ("test", test)):
            kept = []
            env = cls(problems, shared) if problems else None
            for i, p in enumerate(problems):
                obs = env.reset(0, index=i)
                if len(render(tokenizer, obs.messages, obs.tools, add_generation_prompt=True).ids) + budget <= seq_len:
                    kept.append(p)
            pool.dropped_long += len(problems) - len(kept)
            setattr(pool, split, kept)
        if not train or not test:
            raise K2Error(f"the {name} environment has no {'training' if not train else 'held-out'} problems in this data",
                          "use a larger world (k2 data synth --size) or raise envs.train_size / envs.test_size")
        if not pool.train or not pool.test:
            raise K2Error(f"no {name} problem fits train.seq_len={seq_len} with a budget of {budget} tokens",
                          f"raise train.seq_len or lower envs.budget.{name}")
        pools[name] = pool
    return pools
