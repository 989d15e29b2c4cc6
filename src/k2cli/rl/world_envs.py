"""Single-turn environments on the synthetic world: math, logic, instruct (verifiable) and chat (rubric).

    math      word problems with exact integer answers: the dataset's math/ (train split for
              rollouts, test split held out) plus fresh draws from the same generators
              (k2cli.data.synth.math_problems with another seed); reward 1 if the answer
              ("The answer is N", else the last integer) is exact
    logic     ordering and look-up puzzles whose facts are in the prompt (who is oldest, which
              city is largest, who works for X in a small table); reward 1 if the reply names the
              right option and no other
    instruct  a request about the world plus verifiable constraints (at most N words, a required
              word, JSON with a key, a required first word, lowercase, no commas); reward = the
              fraction of constraints met, correct = all of them
    chat      open requests (introduce a person, describe a city or a company) with a per-task
              rubric: no verifier, the reward is the critic's pairwise win rate (rl/critic.py);
              info["facts"] (how many of the rubric's facts the reply states) is logged, never used

Every problem is a dict with at least "prompt"; the generators draw from `random.Random` streams
named by (seed, environment, split, index), so pools are the same on every run.
"""

from __future__ import annotations

import json
import random

from k2cli.data.chat import ParsedTurn
from k2cli.data.synth import extract_answer, math_problems
from k2cli.rl.env import Environment, WorldData, register

SPLIT_SEEDS = {"train": 1, "test": 2}


def _draw(world, n: int, seed: int, name: str, split: str, make) -> list[dict]:
    """n distinct problems from `make(world, rng)`, each from its own random stream."""
    out, seen = [], set()
    for i in range(n * 4):
        if len(out) == n:
            break
        p = make(world, random.Random(f"{seed}:{name}:{split}:{i}"))
        if p is not None and p["prompt"] not in seen:
            seen.add(p["prompt"])
            out.append(p)
    return out


def _train_test(world, cfg, seed: int, name: str, make) -> tuple[list[dict], list[dict]]:
    train = _draw(world, cfg.train_size, seed, name, "train", make)
    test = _draw(world, cfg.test_size, seed, name, "test", make)
    seen = {p["prompt"] for p in train}
    return train, [p for p in test if p["prompt"] not in seen]  # held out means never a training prompt


def _mentions(text: str, option: str) -> bool:
    return option.lower() in text.lower()


# ----------------------------------------------------------------------------- math


@register
class MathEnv(Environment):
    name = "math"
    description = "world word problems with exact integer answers (dataset math/ + fresh draws)"
    default_budget = 64
    task_rubric = "The final answer is right."

    @classmethod
    def load(cls, data: WorldData, cfg):
        def row(r):
            return {"prompt": r["problem"], "answer": str(r["answer"]), "kind": r.get("kind", "")}

        train = [row(r) for r in data.math if r.get("split", "train") != "test"]
        test = [row(r) for r in data.math if r.get("split", "train") == "test"]
        # fresh problems from the same generators: another seed, so none is in the corpus or the SFT data
        fresh = [row(r) for r in math_problems(data.world, cfg.train_size + cfg.test_size, seed=data.seed + 7919)]
        seen = {p["prompt"] for p in train + test}
        fresh = [p for p in fresh if p["prompt"] not in seen]
        train += fresh[: cfg.train_size]
        test += fresh[cfg.train_size:]
        return train, test, None

    def score(self, problem, turn: ParsedTurn):
        got = extract_answer(turn.content)
        ok = got == problem["answer"]
        return float(ok), {"correct": ok, "answer": got, "expected": problem["answer"]}


# ----------------------------------------------------------------------------- logic


def _ages(world, rng):
    people = rng.sample(world.people, rng.choice((2, 3)))
    if len({p.birth_year for p in people}) < len(people):
        return None
    oldest = rng.random() < 0.5
    facts = [f"{p.name} was born in {p.birth_year}" for p in people]
    pick = min if oldest else max
    answer = pick(people, key=lambda p: p.birth_year).name
    q = "Who is the oldest?" if oldest else "Who is the youngest?"
    return {"prompt": f"{', '.join(facts[:-1])} and {facts[-1]}. {q}", "answer": answer, "options": [p.name for p in people],
            "kind": "ages"}


def _cities(world, rng):
    cities = rng.sample(world.cities, rng.choice((2, 3)))
    most = rng.random() < 0.5
    facts = [f"{c.name} has {c.population} inhabitants" for c in cities]
    pick = max if most else min
    answer = pick(cities, key=lambda c: c.population).name
    q = "Which city has the most inhabitants?" if most else "Which city has the fewest inhabitants?"
    return {"prompt": f"{', '.join(facts[:-1])} and {facts[-1]}. {q}", "answer": answer, "options": [c.name for c in cities],
            "kind": "cities"}


def _table(world, rng):
    people = rng.sample(world.people, 3)
    employers = [world.org(p.employer_id).name for p in people]
    if len(set(employers)) < 3:
        return None
    rows = "\n".join(f"{p.name} | {e}" for p, e in zip(people, employers))
    k = rng.randrange(3)
    if rng.random() < 0.5:
        q, answer, options = f"Who works for {employers[k]}?", people[k].name, [p.name for p in people]
    else:
        q, answer, options = f"Which company does {people[k].name} work for?", employers[k], employers
    return {"prompt": f"Name | Employer\n{rows}\n{q}", "answer": answer, "options": options, "kind": "table"}


LOGIC_KINDS = (_ages, _cities, _table)


def logic_problem(world, rng):
    return rng.choice(LOGIC_KINDS)(world, rng)


@register
class LogicEnv(Environment):
    name = "logic"
    description = "ordering and table look-up puzzles whose facts are in the prompt (name the one right option)"
    default_budget = 24
    task_rubric = "Names the one right option."

    @classmethod
    def load(cls, data: WorldData, cfg):
        train, test = _train_test(data.world, cfg, data.seed, cls.name, logic_problem)
        return train, test, None

    def score(self, problem, turn: ParsedTurn):
        named = [o for o in problem["options"] if _mentions(turn.content, o)]
        ok = named == [problem["answer"]]
        return float(ok), {"correct": ok, "named": named, "expected": problem["answer"]}


# ----------------------------------------------------------------------------- instruction following


def _words(text: str) -> int:
    return len(text.split())


def _json_with(text: str, key: str) -> bool:
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return False
    return isinstance(obj, dict) and key in obj


# name -> (phrase, check(content, args) -> bool)
CONSTRAINTS = {
    "max_words": ("Use at most {n} words.", lambda t, a: 0 < _words(t) <= a["n"]),
    "keyword": ('Include the word "{word}".', lambda t, a: a["word"].lower() in t.lower()),
    "json": ('Reply in JSON with the key "{key}".', lambda t, a: _json_with(t, a["key"])),
    "starts_with": ('Start your reply with "{word}".', lambda t, a: t.startswith(a["word"])),
    "lowercase": ("Write in lowercase only.", lambda t, a: any(c.isalpha() for c in t) and t == t.lower()),
    "no_comma": ("Do not use commas.", lambda t, a: bool(t.strip()) and "," not in t),
}
CONFLICTS = {frozenset(("json", "starts_with")), frozenset(("json", "lowercase"))}


def check_constraint(name: str, args: dict, text: str) -> bool:
    return bool(CONSTRAINTS[name][1](text.strip(), args))


def instruct_problem(world, rng):
    p = rng.choice(world.people)
    city = world.city(rng.choice(world.cities).id)
    request = rng.choice([
        f"Which company does {p.name} work for?",
        f"Where does {p.name} work?",
        f"Tell me about {p.name}.",
        f"Describe {city.name}.",
    ])
    names = rng.sample(sorted(CONSTRAINTS), 2)
    if frozenset(names) in CONFLICTS:
        return None
    args = {"max_words": {"n": rng.randint(3, 12)},
            "keyword": {"word": rng.choice([p.last_name, city.name, world.org(p.employer_id).name.split()[0]])},
            "json": {"key": rng.choice(["answer", "name", "city"])},
            "starts_with": {"word": rng.choice(["Yes", "Sure", "Answer", "Note"])}}
    cons = [{"name": n, "args": args.get(n, {})} for n in names]
    phrases = " ".join(CONSTRAINTS[c["name"]][0].format(**c["args"]) for c in cons)
    return {"prompt": f"{request} {phrases}", "constraints": cons, "kind": "+".join(names)}


@register
class InstructEnv(Environment):
    name = "instruct"
    description = "requests with verifiable constraints (length, required words, JSON, first word, case, commas)"
    default_budget = 32
    task_rubric = "Follows every constraint of the request."

    @classmethod
    def load(cls, data: WorldData, cfg):
        train, test = _train_test(data.world, cfg, data.seed, cls.name, instruct_problem)
        return train, test, None

    def score(self, problem, turn: ParsedTurn):
        met = {c["name"]: check_constraint(c["name"], c["args"], turn.content) for c in problem["constraints"]}
        frac = sum(met.values()) / len(met)
        return frac, {"correct": all(met.values()), "met": met}


# ----------------------------------------------------------------------------- chat (rubric reward)


def chat_problems(world) -> list[dict]:
    """Every (entity, request) of the world: people, cities, companies, two phrasings each."""
    out = []
    for p in world.people:
        employer, city = world.org(p.employer_id).name, world.city(p.employer_city_id).name
        for prompt in (f"Introduce {p.name} to a new colleague.", f"Who is {p.name}?"):
            out.append({"prompt": prompt, "entity": p.id, "facts": [employer, city, p.major], "kind": "person",
                        "rubric": f"Says that {p.name} works for {employer} in {city} and studied {p.major}."})
    for c in world.cities:
        for prompt in (f"Tell me about {c.name}.", f"What is {c.name} like?"):
            out.append({"prompt": prompt, "entity": c.id, "facts": [c.country, str(c.population)], "kind": "city",
                        "rubric": f"Says that {c.name} is in {c.country} and has {c.population} inhabitants."})
    for o in world.companies:
        hq = world.city(o.hq_city_id).name
        for prompt in (f"What do you know about {o.name}?", f"Describe the company {o.name}."):
            out.append({"prompt": prompt, "entity": o.id, "facts": [hq, o.industry], "kind": "company",
                        "rubric": f"Says that {o.name} works in {o.industry} and is headquartered in {hq}."})
    return out


@register
class ChatEnv(Environment):
    name = "chat"
    description = "open requests judged by the critic against core, prescriptive and per-task rubrics (no verifier)"
    verifiable = False
    default_budget = 32

    @classmethod
    def load(cls, data: WorldData, cfg):
        # held out by entity: a fifth of the people, cities and companies are only ever asked about in the test split
        problems = chat_problems(data.world)
        random.Random(f"{data.seed}:chat").shuffle(problems)
        test_ids = {e for e in sorted({p["entity"] for p in problems}) if random.Random(f"{data.seed}:chat:{e}").random() < 0.2}
        train = [p for p in problems if p["entity"] not in test_ids]
        test = [p for p in problems if p["entity"] in test_ids]
        return train[: cfg.train_size], test[: cfg.test_size], None

    def score(self, problem, turn: ParsedTurn):
        stated = sum(_mentions(turn.content, f) for f in problem["facts"])
        return 0.0, {"correct": None, "facts": stated / len(problem["facts"])}
