"""Knowledge and math documents about the synthetic world (`k2cli.data.world`).

Three products, all deterministic in the seed:

* biographies (Physics of Language Models 3.1, bioS): one sentence per attribute, each drawn from
  a library of templates. The paper's augmentations are recipe switches: `per_person` (multiM: M
  biographies per person with independently drawn templates), `permute` (shuffled sentence order)
  and `fullname` (the full name in every sentence instead of pronouns);
* QA pairs for every attribute of every person, split by person: QA-train people and QA-test
  people (pre-train on all biographies, fine-tune QA on one half, test on the other);
* math word problems grounded in world entities (a person's bank balance, a company's offices,
  a city's population, time zones) with exact integer answers and structured steps.

The template language is shared with the builtin rephraser (`k2cli.data.rephrase.builtin`): a
template is a sentence with slots — attribute slots like `{birth_city}` and subject slots that
render as the full name or a pronoun:

    {N} the full name      {S}/{s} subject (name or He/he, She/she)      {P}/{p} possessive (name's or His/his, Her/her)

`template_regex` turns the same template back into a regular expression, so the text we write is
text we can parse.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from k2cli.data.world import ATTRIBUTES, PRONOUNS, Person, World

# ----------------------------------------------------------------------------- the template language

# Several templates per attribute sentence (bioS uses ~50; a handful per attribute keeps the
# vocabulary small while still separating the facts from any one phrasing).
BIO_TEMPLATES: dict[str, list[str]] = {
    "birth_date": [
        "{S} was born on {birth_date}.",
        "{S} came into this world on {birth_date}.",
        "{P} birthday is {birth_date}.",
        "{S} celebrates {p} birthday on {birth_date}.",
        "{P} life began on {birth_date}.",
        "{S} was welcomed into the world on {birth_date}.",
        "The day {s} was born was {birth_date}.",
        "{S} arrived on {birth_date}.",
    ],
    "birth_city": [
        "{S} was born in {birth_city}.",
        "{S} spent {p} early years in {birth_city}.",
        "{S} grew up in {birth_city}.",
        "{P} hometown is {birth_city}.",
        "{S} was raised in {birth_city}.",
        "{S} is a native of {birth_city}.",
        "{P} birthplace is {birth_city}.",
        "{S} first saw the light of day in {birth_city}.",
    ],
    "university": [
        "{S} studied at {university}.",
        "{S} graduated from {university}.",
        "{S} received {p} education at {university}.",
        "{S} attended {university}.",
        "{S} completed {p} degree at {university}.",
        "{P} alma mater is {university}.",
        "{S} was a student at {university}.",
    ],
    "major": [
        "{S} majored in {major}.",
        "{S} focused on {major} during {p} studies.",
        "{P} field of study was {major}.",
        "{S} earned a degree in {major}.",
        "{S} specialized in {major}.",
        "{S} chose {major} as {p} major.",
        "{S} devoted {p} studies to {major}.",
    ],
    "employer": [
        "{S} works for {employer}.",
        "{S} is employed by {employer}.",
        "{S} has a job at {employer}.",
        "{P} employer is {employer}.",
        "{S} is on the staff of {employer}.",
        "{S} earns a living at {employer}.",
        "{S} holds a position at {employer}.",
    ],
    "employer_city": [
        "{S} works in {employer_city}.",
        "{S} is based in {employer_city} for work.",
        "{P} office is in {employer_city}.",
        "{S} commutes to work in {employer_city}.",
        "{S} has {p} workplace in {employer_city}.",
        "{P} job is located in {employer_city}.",
        "{S} practices {p} profession in {employer_city}.",
    ],
}

# One question per attribute (PLM 3.1 asks each attribute the same way), and the sentence prefix a
# base model completes with the answer (the first template of each attribute, name as subject).
QUESTIONS = {
    "birth_date": "What is the birth date of {N}?",
    "birth_city": "What is the birth city of {N}?",
    "university": "Which university did {N} study at?",
    "major": "What major did {N} study?",
    "employer": "Which company does {N} work for?",
    "employer_city": "Where does {N} work?",
}
CLOZES = {
    "birth_date": "{N} was born on",
    "birth_city": "{N} was born in",
    "university": "{N} studied at",
    "major": "{N} majored in",
    "employer": "{N} works for",
    "employer_city": "{N} works in",
}

SLOT = re.compile(r"\{(\w+)\}")
SUBJECT_SLOTS = ("N", "S", "s", "P", "p")
NAME_RE = r"[A-Z][a-z]+(?: [A-Z][a-z]+)+"  # two or more capitalised words: "Anna Avery Berg"
DATE_RE = r"(?:January|February|March|April|May|June|July|August|September|October|November|December) \d{1,2}, \d{4}"
# An entity value: capitalised words, joined by spaces and a few lowercase connectors ("University of ...").
ENTITY_RE = r"[A-Z][\w'&-]*(?: (?:of|and|de|la|[A-Z][\w'&-]*))*"
SLOT_RE = {
    "N": NAME_RE,
    "S": rf"He|She|{NAME_RE}",
    "s": rf"he|she|{NAME_RE}",
    "P": rf"His|Her|{NAME_RE}'s",
    "p": rf"his|her|{NAME_RE}'s",
    "birth_date": DATE_RE,
}


@dataclass
class Subject:
    """Who a sentence is about: the full name, and the gender that picks the pronouns."""

    name: str
    gender: str | None  # None: unknown, so the full name is used everywhere

    def form(self, slot: str, use_name: bool) -> str:
        """The text of a subject slot: the name (N always; S/s/P/p when `use_name`) or a pronoun."""
        if slot == "N" or use_name or self.gender is None:
            return f"{self.name}'s" if slot in ("P", "p") else self.name
        pr = PRONOUNS[self.gender]
        word = pr["possessive"] if slot in ("P", "p") else pr["subject"]
        return word.capitalize() if slot in ("S", "P") else word


def fill(template: str, values: dict[str, str], subject: Subject, use_name: bool) -> str:
    """Render a template. With `use_name` the first subject slot names the person and later ones in
    the same sentence are pronouns ("Anna Avery Berg celebrates her birthday"); otherwise all are
    pronouns. Without a known gender every slot is the name."""
    named = False

    def slot(m: re.Match) -> str:
        nonlocal named
        key = m.group(1)
        if key in values:
            return values[key]
        if key == "N":
            named = True
            return subject.name
        here = use_name and not named
        named = named or here
        return subject.form(key, here)

    return SLOT.sub(slot, template)


def template_slots(template: str) -> set[str]:
    """The attribute slots of a template (subject slots excluded)."""
    return {s for s in SLOT.findall(template) if s not in SUBJECT_SLOTS}


def template_regex(template: str, anchored: bool = True) -> re.Pattern:
    """The regular expression that recognises sentences written from `template`.

    A slot used twice must hold the same text both times (a backreference)."""
    parts, seen = [], set()
    for i, piece in enumerate(SLOT.split(template)):
        if i % 2 == 0:
            parts.append(re.escape(piece))
        elif piece in seen:
            parts.append(f"(?P={piece})")
        else:
            seen.add(piece)
            parts.append(f"(?P<{piece}>{SLOT_RE.get(piece, ENTITY_RE)})")
    body = "".join(parts)
    return re.compile(f"^{body}$" if anchored else body)


# ----------------------------------------------------------------------------- biographies


def _rng(seed: int, *parts) -> random.Random:
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def biography(world: World, person: Person, rng: random.Random, permute: bool = False, fullname: bool = False) -> str:
    """Six template sentences, one per attribute: the first names the person, the rest use
    pronouns unless `fullname`; in bioS order unless `permute`."""
    values = world.attributes(person)
    order = list(ATTRIBUTES)
    if permute:
        rng.shuffle(order)
    subject = Subject(person.name, person.gender)
    sentences = [fill(rng.choice(BIO_TEMPLATES[a]), values, subject, use_name=(i == 0 or fullname))
                 for i, a in enumerate(order)]
    return " ".join(sentences)


def biographies(world: World, per_person: int = 1, permute: bool = False, fullname: bool = False, seed: int = 0) -> list[dict]:
    """Corpus records for every person: text, doc_id, source="bio", person_id."""
    docs = []
    for p in world.people:
        for k in range(per_person):
            text = biography(world, p, _rng(seed, "bio", p.id, k), permute, fullname)
            docs.append({"text": text, "doc_id": f"bio-{p.id}-{k}", "source": "bio", "person_id": p.id})
    return docs


# ----------------------------------------------------------------------------- QA


def qa_split(world: World, test_fraction: float = 0.5, seed: int = 0) -> tuple[list[str], list[str]]:
    """Person ids for QA-train and QA-test (disjoint; both non-empty; each in world order)."""
    ids = [p.id for p in world.people]
    shuffled = list(ids)
    _rng(seed, "qa-split").shuffle(shuffled)
    n_test = min(len(ids) - 1, max(1, round(len(ids) * test_fraction)))
    test = set(shuffled[:n_test])
    return [i for i in ids if i not in test], [i for i in ids if i in test]


def qa_pairs(world: World, person_ids: list[str]) -> list[dict]:
    """One QA pair per attribute per person; the answer is written exactly as in the biographies."""
    rows = []
    for pid in person_ids:
        p = world.person(pid)
        values = world.attributes(p)
        for a in ATTRIBUTES:
            rows.append({"question": QUESTIONS[a].format(N=p.name), "answer": values[a], "person_id": pid,
                         "attribute": a, "cloze": CLOZES[a].format(N=p.name)})
    return rows


# ----------------------------------------------------------------------------- math word problems
#
# Each generator returns the problem text, its steps and the entities it is about. A step is one
# binary operation on non-negative integers, "label: a op b = c"; the last step's result is the
# answer. Every number a step uses is in the problem or is an earlier step's result, so the
# solution is checkable line by line (tests re-compute it).

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


def _pronouns(p: Person) -> dict[str, str]:
    """{"S": "She", "s": "she", "p": "her", ...} for a person (word problems name them once, then use pronouns)."""
    return {k: Subject(p.name, p.gender).form(k, use_name=False) for k in ("S", "s", "P", "p")}


class Steps:
    """Collects steps; `do` returns the step's value so generators read like the arithmetic."""

    def __init__(self):
        self.lines: list[str] = []

    def do(self, label: str, a: int, op: str, b: int) -> int:
        assert a >= 0 and b >= 0 and (op != "/" or (b and a % b == 0)), (a, op, b)
        c = OPS[op](a, b)
        self.lines.append(f"{label}: {a} {op} {b} = {c}")
        return c


def _savings(world: World, rng: random.Random):
    p = rng.choice(world.people)
    bank = rng.choice([o for o in world.companies if o.industry == "finance"] or world.companies)
    s = _pronouns(p)
    dep, months = rng.randint(2, 30) * 10, rng.randint(2, 12)
    total = p.account_balance + dep * months
    w = rng.randint(1, max(1, total // 20)) * 10
    text = (f"{p.name} has {p.account_balance} dollars in {s['p']} account at {bank.name}. {s['S']} deposits {dep} dollars "
            f"every month for {months} months and then withdraws {w} dollars. How many dollars are in the account now?")
    st = Steps()
    deposits = st.do("Money deposited", months, "*", dep)
    after = st.do("Balance after the deposits", p.account_balance, "+", deposits)
    st.do("Balance after the withdrawal", after, "-", w)
    return text, st, [p.id, bank.id]


def _salary(world: World, rng: random.Random):
    p = rng.choice(world.people)
    s = _pronouns(p)
    employer, city = world.org(p.employer_id), world.city(p.employer_city_id)
    rent = rng.randint(p.monthly_salary // 40, p.monthly_salary // 20) * 10
    food = rng.randint(1, max(1, (p.monthly_salary - rent) // 20)) * 10
    months = rng.randint(2, 12)
    text = (f"{p.name} works for {employer.name} in {city.name} and earns {p.monthly_salary} dollars a month. "
            f"{s['S']} pays {rent} dollars for rent and {food} dollars for food every month. "
            f"How many dollars does {s['s']} save in {months} months?")
    st = Steps()
    left = st.do("Left after rent", p.monthly_salary, "-", rent)
    saved = st.do("Saved each month", left, "-", food)
    st.do(f"Saved in {months} months", saved, "*", months)
    return text, st, [p.id, employer.id, city.id]


def _order(world: World, rng: random.Random):
    p = rng.choice(world.people)
    s = _pronouns(p)
    shop = rng.choice(world.companies)
    (item1, item2) = rng.sample(["notebooks", "lamps", "chairs", "printer cartridges", "coffee mugs", "backpacks", "desk fans"], 2)
    q1, p1, q2, p2 = rng.randint(2, 9), rng.randint(3, 60), rng.randint(2, 9), rng.randint(3, 60)
    discount = rng.randint(1, (q1 * p1 + q2 * p2) // 4)
    text = (f"{p.name} orders {q1} {item1} at {p1} dollars each and {q2} {item2} at {p2} dollars each from {shop.name}. "
            f"{shop.name} takes {discount} dollars off the order. How many dollars does {s['s']} pay?")
    st = Steps()
    c1 = st.do(f"Cost of the {item1}", q1, "*", p1)
    c2 = st.do(f"Cost of the {item2}", q2, "*", p2)
    total = st.do("Order total", c1, "+", c2)
    st.do("After the discount", total, "-", discount)
    return text, st, [p.id, shop.id]


def _headcount(world: World, rng: random.Random):
    org = rng.choice(world.companies)
    hq = world.city(org.hq_city_id)
    staff, offices, each = rng.randint(50, 900), rng.randint(2, 6), rng.randint(10, 80)
    leave = rng.randint(1, staff // 5)
    text = (f"{org.name} has {staff} employees at its headquarters in {hq.name}. It opens {offices} new offices with "
            f"{each} employees each, and {leave} employees leave the headquarters. How many employees does {org.name} have now?")
    st = Steps()
    new = st.do("Employees in the new offices", offices, "*", each)
    total = st.do("Employees after the opening", staff, "+", new)
    st.do("Employees after the departures", total, "-", leave)
    return text, st, [org.id, hq.id]


def _time_zones(world: World, rng: random.Random):
    p = rng.choice(world.people)
    s = _pronouns(p)
    whole = [c for c in world.cities if float(c.utc_offset).is_integer()]
    a, b = sorted(rng.sample(whole, 2), key=lambda c: c.utc_offset)  # flying east: local time gains hours
    a_off, b_off = int(a.utc_offset), int(b.utc_offset)
    diff = b_off - a_off
    hours = rng.randint(1, max(1, 23 - diff - 6))
    depart = rng.randint(0, 23 - diff - hours)
    text = (f"{p.name} flies from {a.name} (UTC{a_off:+d}) to {b.name} (UTC{b_off:+d}), leaving {a.name} at {depart}:00 "
            f"local time. The flight takes {hours} hours. At what hour, local time in {b.name}, does {s['s']} land?")
    st = Steps()
    arrive_a = st.do(f"Landing time on the clock of {a.name}", depart, "+", hours)
    # the offset difference b - a, written with non-negative operands
    if a_off >= 0:
        d = st.do("Hours between the two time zones", b_off, "-", a_off)
    elif b_off >= 0:
        d = st.do("Hours between the two time zones", b_off, "+", -a_off)
    else:
        d = st.do("Hours between the two time zones", -a_off, "-", -b_off)
    st.do(f"Landing time in {b.name}", arrive_a, "+", d)
    return text, st, [p.id, a.id, b.id]


def _ages(world: World, rng: random.Random):
    p, q = rng.sample(world.people, 2)
    year = rng.randint(max(p.birth_year, q.birth_year) + 1, 2060)
    text = (f"{p.name} was born in {p.birth_year} and {q.name} was born in {q.birth_year}. "
            f"Counting whole years, how old will they be together at the end of {year}?")
    st = Steps()
    ap = st.do(f"Age of {p.first_name} at the end of {year}", year, "-", p.birth_year)
    aq = st.do(f"Age of {q.first_name} at the end of {year}", year, "-", q.birth_year)
    st.do("Ages together", ap, "+", aq)
    return text, st, [p.id, q.id]


def _population(world: World, rng: random.Random):
    c = rng.choice(world.cities)
    births = rng.randint(50, 900) * 10
    deaths = rng.randint(10, births // 10 - 1) * 10
    years = rng.randint(2, 10)
    text = (f"{c.name} in {c.country} has {c.population} inhabitants. Every year {births} people are born there and "
            f"{deaths} people die. Nobody moves in or out. How many inhabitants will {c.name} have after {years} years?")
    st = Steps()
    growth = st.do("Growth per year", births, "-", deaths)
    total = st.do(f"Growth over {years} years", growth, "*", years)
    st.do("Inhabitants at the end", c.population, "+", total)
    return text, st, [c.id]


MATH_KINDS = {"savings": _savings, "salary": _salary, "order": _order, "headcount": _headcount,
              "time_zones": _time_zones, "ages": _ages, "population": _population}


def solution_text(steps: list[str], answer: int) -> str:
    return "Solution: " + " ".join(f"{s}." for s in steps) + f" The answer is {answer}."


ANSWER = re.compile(r"answer is (-?\d+)")
INTEGER = re.compile(r"-?\d+")


def extract_answer(text: str) -> str | None:
    """The answer of a written solution (what eval's math suite and RL's math environment check):
    '... The answer is 42.' -> '42'; else the last integer written; else None."""
    m = ANSWER.findall(text)
    if m:
        return m[-1]
    ints = INTEGER.findall(text)
    return ints[-1] if ints else None


def math_document(row: dict) -> str:
    """The corpus text of a math problem: the problem, then its worked solution."""
    return f"{row['problem']}\n{row['solution']}"


def math_problems(world: World, count: int, seed: int = 0, test_fraction: float = 0.0) -> list[dict]:
    """`count` word problems, kinds in rotation; a `split` column holds out `test_fraction` of them."""
    kinds = sorted(MATH_KINDS)
    rows = []
    n_test = round(count * test_fraction)
    test_idx = set(_rng(seed, "math-split").sample(range(count), n_test)) if n_test else set()
    for i in range(count):
        rng = _rng(seed, "math", i)
        kind = kinds[rng.randrange(len(kinds))]
        text, st, entities = MATH_KINDS[kind](world, rng)
        answer = int(st.lines[-1].rsplit("= ", 1)[1])
        rows.append({"math_id": f"math-{i:06d}", "kind": kind, "problem": text, "answer": str(answer),
                     "answer_value": answer, "solution": solution_text(st.lines, answer), "steps": list(st.lines),
                     "entity_ids": entities, "split": "test" if i in test_idx else "train"})
    return rows


# ----------------------------------------------------------------------------- saving datasets deterministically


def content_fingerprint(records: list[dict]) -> str:
    """A fingerprint from the records themselves. Some `datasets` versions and operations write a
    random fingerprint into state.json; setting our own keeps the same data the same bytes."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def save_dataset(records: list[dict], path: str | Path, features=None) -> None:
    """Save records as an HF dataset (`save_to_disk`) whose files depend only on the records."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_list(records, features=features)
    ds._fingerprint = content_fingerprint(records)
    ds.save_to_disk(str(path))


def estimate_tokens(texts) -> int:
    """A tokenizer-free size estimate: about 4 characters per BPE token for English text."""
    return sum(len(t) for t in texts) // 4
