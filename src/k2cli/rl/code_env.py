"""The code environment: write a short Python function, checked by unit tests in the sandbox.

A problem names the function and its behaviour with world values in it ("... returns how old a
person born in birth_year is at the end of year"); its tests are call expressions with expected
values. The calls run in `k2cli.rl.sandbox` (kernel isolation: namespaces, a dedicated uid,
Landlock, seccomp, rlimits -- see there); only the calls' values come back, and the expected values
never enter the sandbox: they are compared here. Reward = the fraction of tests passed; a snippet
that times out, hits a limit or trips the sandbox scores 0. The code is the reply's ```python
block, else the reply from its first `def`.

Where the OS offers no isolation, loading the environment refuses (one `error:` line) unless the
recipe says `envs.unsafe_sandbox = true` (`--unsafe-sandbox`).
"""

from __future__ import annotations

import re

from k2cli.data.chat import ParsedTurn
from k2cli.rl.env import Environment, WorldData, register
from k2cli.rl.sandbox import require_isolation, run_tests
from k2cli.rl.world_envs import _train_test


def _add(world, rng):
    n = rng.randint(2, 99)
    return {"prompt": f"Write a Python function add(x) that returns x plus {n}.", "function": "add",
            "tests": [[f"add({x})", x + n] for x in (0, 7, -3)]}


def _age(world, rng):
    years = [p.birth_year for p in rng.sample(world.people, 3)]
    return {"prompt": "Write a Python function age(birth_year, year) that returns how old a person born in birth_year "
                      "is at the end of year.", "function": "age",
            "tests": [[f"age({y}, {y + d})", d] for y, d in zip(years, (rng.randint(1, 60) for _ in years))]}


def _works_in(world, rng):
    people = rng.sample(world.people, 2)
    table = {p.name: world.city(p.employer_city_id).name for p in people}
    shown = ", ".join(f"{n} works in {c}" for n, c in table.items())
    return {"prompt": f"{shown}. Write a Python function city(name) that returns the city where name works.",
            "function": "city", "tests": [[f"city({n!r})", c] for n, c in table.items()]}


def _savings(world, rng):
    p = rng.choice(world.people)
    return {"prompt": f"{p.name} earns {p.monthly_salary} dollars a month. Write a Python function saved(spent, months) that "
                      f"returns how many dollars {p.first_name} saves in months months when spending spent dollars a month.",
            "function": "saved",
            "tests": [[f"saved({s}, {m})", (p.monthly_salary - s) * m] for s, m in ((100, 2), (250, 3), (0, 12))]}


CODE_KINDS = (_add, _age, _works_in, _savings)


def code_problem(world, rng):
    return rng.choice(CODE_KINDS)(world, rng)


_FENCE = re.compile(r"```(?:python)?\n(.*?)(?:```|$)", re.S)


def extract_code(text: str) -> str | None:
    m = _FENCE.search(text)
    if m:
        return m.group(1)
    i = text.find("def ")
    return text[i:] if i >= 0 else None


@register
class CodeEnv(Environment):
    name = "code"
    description = "short Python functions over world facts, checked by unit tests in a sandboxed subprocess"
    default_budget = 96
    task_rubric = "The function is correct."
    timeout_s = 2.0
    memory_mb = 256

    @classmethod
    def load(cls, data: WorldData, cfg):
        unsafe = bool(getattr(cfg, "unsafe_sandbox", False))
        require_isolation(unsafe)  # before any training: refuse (or warn, once) where nothing isolates the code
        train, test = _train_test(data.world, cfg, data.seed, cls.name, code_problem)
        return train, test, {"unsafe_sandbox": unsafe}  # `shared`: what every episode's sandbox run needs

    def score(self, problem, turn: ParsedTurn):
        code = extract_code(turn.content)
        if code is None or f"def {problem['function']}" not in code:
            return 0.0, {"correct": False, "status": "no_code"}  # nothing to run: skip the subprocess
        unsafe = bool((self.shared or {}).get("unsafe_sandbox"))
        res = run_tests(code, [c for c, _ in problem["tests"]], self.timeout_s, self.memory_mb, unsafe=unsafe)
        passed = sum(out == want for out, (_, want) in zip(res.outputs, problem["tests"])) if res.status == "ok" else 0
        return passed / len(problem["tests"]), {"correct": passed == len(problem["tests"]), "status": res.status,
                                                 "passed": passed}
