"""The builtin backend: an offline rewriter for the language of `k2 data synth`.

It does what a model would be asked to do, for text whose facts it can recognise exactly:

    parse      every sentence of the source chunk against the biography templates (synth.py),
               recovering the person and each attribute value; a math document into its problem,
               steps and answer
    re-express the recognised facts in the requested style (8 knowledge styles, 3 math styles):
               other templates, sentences that combine several facts, another sentence order
               (chronological for timelines), another perspective (first person, interviewer,
               colleague), the full name or a pronoun per sentence
    continue   from the already-rewritten context: a chunk that only says "she" is about the
               person the context named, and only the first chunk of a rewrite opens it
               ("Interviewer: Today we are speaking with ...")

Text it cannot parse is refused with an error that points to the model backends: it never passes
text through and calls it a rewrite.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field

from k2cli.data.rephrase.backends import BackendConfig, RewriteRequest
from k2cli.data.rephrase.chunking import split_sentences
from k2cli.data.synth import BIO_TEMPLATES, SLOT, Subject, fill, template_regex, template_slots
from k2cli.data.world import ATTRIBUTES
from k2cli.errors import K2Error

# ----------------------------------------------------------------------------- knowledge styles


@dataclass(frozen=True)
class StyleTemplates:
    facts: list[str]  # each template states one or more attributes; every attribute has single-fact ones
    joiner: str = " "  # between sentences (" ") or lines ("\n")
    opener: list[str] = field(default_factory=list)  # names the person ({N}) at the start of a rewrite
    mention: list[str] = field(default_factory=list)  # names them again in a later chunk whose source does
    chronological: bool = False  # facts in life order instead of shuffled


KNOWLEDGE: dict[str, StyleTemplates] = {
    "encyclopedic": StyleTemplates(facts=[
        "{S} was born on {birth_date} in {birth_city}.",
        "Born in {birth_city} on {birth_date}, {s} later studied {major} at {university}.",
        "{S} hails from {birth_city}.",
        "{P} date of birth is {birth_date}.",
        "{P} place of birth is {birth_city}.",
        "{S} received a degree in {major} from {university}.",
        "{S} was educated at {university}.",
        "{P} academic field is {major}.",
        "{S} is an employee of {employer}, working in {employer_city}.",
        "{S} is employed at the {employer_city} office of {employer}.",
        "{S} is on the payroll of {employer}.",
        "{P} place of work is {employer_city}.",
    ]),
    "news": StyleTemplates(facts=[
        "{S}, a native of {birth_city}, was born on {birth_date}.",
        "Records show that {s} was born on {birth_date}.",
        "Local records list {birth_city} as {p} birthplace.",
        "Sources confirm that {s} studied {major} at {university}.",
        "{S} is reported to hold a degree in {major}.",
        "Colleagues say {s} graduated from {university}.",
        "{S} currently works for {employer} in {employer_city}, according to colleagues.",
        "{S} is now on the staff at {employer}, the company confirmed.",
        "Reports place {p} office in {employer_city}.",
    ]),
    "interview": StyleTemplates(joiner="\n", opener=[
        "Interviewer: Today we are speaking with {N}.",
        "Interviewer: Please welcome our guest, {N}.",
        "Interviewer: Our guest today is {N}.",
    ], mention=[
        "Interviewer: Let us continue our conversation with {N}.",
        "Interviewer: Back to you, {N}.",
    ], facts=[
        "Interviewer: When were you born? {N}: I was born on {birth_date}.",
        "Interviewer: Where did you grow up? {N}: I grew up in {birth_city}.",
        "Interviewer: Where and when were you born? {N}: In {birth_city}, on {birth_date}.",
        "Interviewer: What did you study? {N}: I studied {major} at {university}.",
        "Interviewer: Which university did you attend? {N}: I went to {university}.",
        "Interviewer: What was your major? {N}: My major was {major}.",
        "Interviewer: Where do you work? {N}: I work for {employer} in {employer_city}.",
        "Interviewer: Who is your employer? {N}: I am employed by {employer}.",
        "Interviewer: Which city is your office in? {N}: My office is in {employer_city}.",
    ]),
    "timeline": StyleTemplates(joiner="\n", chronological=True, opener=[
        "Timeline of {N}:",
        "The life of {N} at a glance:",
    ], mention=[
        "Timeline of {N}, continued:",
    ], facts=[
        "- {birth_date}: {S} is born in {birth_city}.",
        "- Born on {birth_date}.",
        "- Birthplace: {birth_city}.",
        "- Early years in {birth_city}.",
        "- Studies {major} at {university}.",
        "- Attends {university}.",
        "- Majors in {major}.",
        "- Joins {employer} and works in {employer_city}.",
        "- Works for {employer}.",
        "- Moves to {employer_city} for work.",
    ]),
    "first_person": StyleTemplates(opener=[
        "My name is {N}.",
        "I am {N}.",
        "Hello, I am {N}.",
    ], mention=[
        "This is {N} again.",
        "{N} here, continuing my story.",
    ], facts=[
        "I was born on {birth_date} in {birth_city}.",
        "My birthday is {birth_date}.",
        "I came into the world on {birth_date}.",
        "I come from {birth_city}.",
        "My hometown is {birth_city}.",
        "I studied {major} at {university}.",
        "I went to {university}.",
        "I hold a degree in {major}.",
        "I work for {employer} in {employer_city}.",
        "My employer is {employer}.",
        "Every day I go to my office in {employer_city}.",
    ]),
    "qa": StyleTemplates(joiner="\n", opener=[
        "Questions and answers about {N}.",
    ], mention=[
        "More questions about {N}.",
    ], facts=[
        "Q: When was {N} born? A: On {birth_date}.",
        "Q: Where was {N} born? A: In {birth_city}.",
        "Q: Where and when was {N} born? A: In {birth_city}, on {birth_date}.",
        "Q: Which university did {N} attend? A: {university}.",
        "Q: What did {N} study? A: {major}.",
        "Q: What did {N} study, and where? A: {major}, at {university}.",
        "Q: Who employs {N}? A: {employer}.",
        "Q: In which city does {N} work? A: {employer_city}.",
        "Q: Where does {N} work? A: At {employer}, in {employer_city}.",
    ]),
    "colleague": StyleTemplates(opener=[
        "Let me tell you about my colleague {N}.",
        "I would like to introduce my colleague {N}.",
    ], mention=[
        "Back to my colleague {N}.",
    ], facts=[
        "{S} was born on {birth_date}, as {s} once told me.",
        "{S} grew up in {birth_city}, and {s} still talks about it.",
        "I know {s} studied {major} at {university}.",
        "{S} studied at {university}, where {s} majored in {major}.",
        "{S} is a proud alumnus of {university}.",
        "{S} is trained in {major}.",
        "{S} was born in {birth_city} and never forgot it.",
        "{S} works with me at {employer} in {employer_city}.",
        "We both work for {employer}, and {p} desk is next to mine.",
        "{S} works at our office in {employer_city}.",
    ]),
    "resume": StyleTemplates(joiner="\n", opener=[
        "Curriculum vitae of {N}",
        "Resume: {N}",
    ], mention=[
        "Curriculum vitae of {N}, continued",
    ], facts=[
        "Date of birth: {birth_date}",
        "Place of birth: {birth_city}",
        "Born: {birth_date}, {birth_city}",
        "Education: {major}, {university}",
        "University: {university}",
        "Field of study: {major}",
        "Current employer: {employer}",
        "Work location: {employer_city}",
        "Experience: {employer}, {employer_city}",
    ]),
}

MATH = ("learning_note", "study_card", "tutor")
OP_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}

# ----------------------------------------------------------------------------- parsing the synth language

_SUBJECT_SLOTS = ("N", "S", "s", "P", "p")
_PRONOUN_GENDER = {"he": "male", "his": "male", "him": "male", "she": "female", "her": "female"}
_BIO_PARSERS = [(t, template_regex(t)) for attr in ATTRIBUTES for t in BIO_TEMPLATES[attr]]
# Unanchored patterns that find the person named in already-rewritten text (any style, or synth's),
# each with its longest literal piece: a cheap substring test that skips most patterns.
_NAME_FINDERS = [(max(SLOT.split(t)[::2], key=len), template_regex(t, anchored=False))
                 for t in [t for st in KNOWLEDGE.values() for t in st.facts + st.opener + st.mention]
                 + [t for ts in BIO_TEMPLATES.values() for t in ts]
                 if any(f"{{{s}}}" in t for s in _SUBJECT_SLOTS)]
_MATH_DOC = re.compile(r"^(?P<problem>[^\n]+)\nSolution: (?P<steps>.+) The answer is (?P<answer>\d+)\.$", re.S)
_STEP = re.compile(r"^(?P<label>[^:]+): (?P<a>\d+) (?P<op>[-+*/]) (?P<b>\d+) = (?P<c>\d+)$")

REFUSAL_HINT = ("the builtin backend rewrites only text written by 'k2 data synth' (biographies and math problems); "
                "rephrase other text with a model: --backend k2:<model ref>, or --backend openai --base-url URL --model NAME")


def refuse(doc_id: str, why: str) -> K2Error:
    return K2Error(f"the builtin rephraser cannot rewrite document '{doc_id}': {why}", REFUSAL_HINT)


@dataclass
class ParsedBio:
    facts: dict[str, str]  # attribute -> value
    name: str | None  # the full name, if the chunk says it
    gender: str | None  # from the chunk's pronouns, if any


def _subject_of(m: re.Match) -> tuple[str | None, str | None]:
    """(name, gender) from the subject slots of a matched sentence."""
    name = gender = None
    for slot in _SUBJECT_SLOTS:
        text = m.groupdict().get(slot)
        if text is None:
            continue
        if text.lower() in _PRONOUN_GENDER:
            gender = _PRONOUN_GENDER[text.lower()]
        else:
            name = text[:-2] if text.endswith("'s") else text
    return name, gender


def parse_bio(chunk: str, doc_id: str) -> ParsedBio:
    """Recover the facts of a biography chunk; refuse anything outside the template language."""
    facts, names, genders = {}, set(), set()
    for sentence in split_sentences(chunk):
        m = next((m for _, rx in _BIO_PARSERS if (m := rx.match(sentence))), None)
        if m is None:
            raise refuse(doc_id, f"no biography template matches {sentence[:80]!r}")
        name, gender = _subject_of(m)
        names |= {name} - {None}
        genders |= {gender} - {None}
        for attr, value in m.groupdict().items():
            if attr in ATTRIBUTES:
                if facts.get(attr, value) != value:
                    raise refuse(doc_id, f"it gives two values for {attr}: {facts[attr]!r} and {value!r}")
                facts[attr] = value
    if len(names) > 1 or len(genders) > 1:
        raise refuse(doc_id, f"it is about more than one person ({', '.join(sorted(names | genders))})")
    return ParsedBio(facts, next(iter(names), None), next(iter(genders), None))


def name_in(context: str) -> str | None:
    """The person the already-rewritten text last named (it always names them: openers, first sentences)."""
    best, at = None, -1
    for literal, rx in _NAME_FINDERS:
        if literal not in context:
            continue
        for m in rx.finditer(context):
            name, _ = _subject_of(m)
            if name and m.start() > at:
                best, at = name, m.start()
    return best


def gender_in(text: str) -> str | None:
    words = re.findall(r"\b(he|his|him|she|her)\b", text, re.I)
    return _PRONOUN_GENDER[words[-1].lower()] if words else None


# ----------------------------------------------------------------------------- writing


def render_facts(st: StyleTemplates, facts: dict[str, str], subject: Subject, rng: random.Random,
                 first: bool, must_name: bool, fullname_prob: float) -> str:
    """The facts of one chunk in style `st`. `first`: the chunk opens the rewrite; `must_name`:
    the source chunk names the person, so the rewrite must too."""
    lines = []
    if first and st.opener:
        lines.append(fill(rng.choice(st.opener), {}, subject, True))
        must_name = False
    elif must_name and st.mention:
        lines.append(fill(rng.choice(st.mention), {}, subject, True))
        must_name = False
    order = [a for a in ATTRIBUTES if a in facts]
    if not st.chronological:
        rng.shuffle(order)
    while order:
        # a template that states the next fact, and possibly others still to be stated
        candidates = [t for t in st.facts if order[0] in template_slots(t) and template_slots(t) <= set(order)]
        t = rng.choice(candidates)
        use_name = must_name or rng.random() < fullname_prob
        lines.append(fill(t, {a: facts[a] for a in template_slots(t)}, subject, use_name))
        must_name = False  # opener-less styles have a subject slot in every template
        order = [a for a in order if a not in template_slots(t)]
    return st.joiner.join(lines)


@dataclass
class ParsedMath:
    question: str
    given: list[str]
    steps: list[dict]  # label, a, op, b, c
    answer: str


def parse_math(text: str, doc_id: str) -> ParsedMath:
    m = _MATH_DOC.match(text.strip())
    if m is None:
        raise refuse(doc_id, "it is not a math document of the form 'problem / Solution: steps. The answer is N.'")
    steps = []
    for piece in re.split(r"(?<=\d)\. ", m.group("steps").rstrip(".")):
        s = _STEP.match(piece.strip())
        if s is None:
            raise refuse(doc_id, f"cannot read the solution step {piece[:80]!r}")
        steps.append(s.groupdict())
    sentences = split_sentences(m.group("problem"))
    questions = [s for s in sentences if s.endswith("?")]
    if not questions:
        raise refuse(doc_id, "the problem asks no question")
    return ParsedMath(questions[-1], [s for s in sentences if s != questions[-1]], steps, m.group("answer"))


def render_math(style: str, p: ParsedMath, rng: random.Random) -> str:
    """A learning note: what is asked and known, concise steps with every calculation, the marked answer.
    Headings, step formats and wording are drawn, so the rewrites of one problem differ."""
    c = rng.choice
    calc = [f"{s['a']} {s['op']} {s['b']} = {s['c']}" for s in p.steps]
    given = " ".join(p.given)
    if style == "learning_note":
        lines = [c(["Learning note", "Study note", "Notes on a word problem"]),
                 f"{c(['What is asked', 'Goal', 'We want to find'])}: {p.question}",
                 f"{c(['What we know', 'Given', 'Known facts'])}: {given}",
                 c(["Step-by-step solution:", "Solution steps:", "How to solve it:"])]
        numbered = c(["{i}. {label}: {calc}", "Step {i}: {label}: {calc}", "{i}) {label}: {calc}"])
        lines += [numbered.format(i=i, label=s["label"], calc=k) for i, (s, k) in enumerate(zip(p.steps, calc), 1)]
    elif style == "study_card":
        lines = [c(["Study card", "Review card", "Practice card"]), f"Question: {p.question}", "Given:"]
        lines += [f"- {g}" for g in p.given] + [c(["Worked steps:", "Steps:", "Working:"])]
        numbered = c(["Step {i}: {label}, {calc}.", "{i}. {label} is {calc}.", "- {label}: {calc}"])
        lines += [numbered.format(i=i, label=s["label"], calc=k) for i, (s, k) in enumerate(zip(p.steps, calc), 1)]
    elif style == "tutor":
        verb = c(["is", "makes", "gives"])
        said = [f"{s['label'][0].lower()}{s['label'][1:]}: {s['a']} {OP_WORDS[s['op']]} {s['b']} {verb} {s['c']}"
                for s in p.steps]
        leads = [c(["First", "To begin"])] + ["Next"] * max(0, len(said) - 2) + ([c(["Finally", "Last"])] if len(said) > 1 else [])
        lines = [f"{c(['Let us work through this problem together.', 'Here is how to think about this problem.'])} "
                 f"{c(['We are asked:', 'The question is:'])} {p.question} {c(['Here is what we know.', 'We are told the following.'])} {given}",
                 " ".join(f"{lead}, {s}." for lead, s in zip(leads, said)),
                 f"{c(['So the result is', 'That gives us'])} {p.answer}."]
    else:
        raise K2Error(f"the builtin backend has no math style '{style}'", f"use one of: {', '.join(MATH)}")
    return "\n".join(lines + [f"Final answer: {p.answer}"])


class BuiltinBackend:
    """Offline rewriting of synth text. No embeddings."""

    name = "builtin"

    def __init__(self, cfg: BackendConfig | None = None):
        self.fullname_prob = (cfg or BackendConfig()).fullname_prob
        library = {"knowledge": {k: asdict(v) for k, v in KNOWLEDGE.items()}, "bio": BIO_TEMPLATES, "math": MATH}
        digest = hashlib.sha256(json.dumps(library, sort_keys=True).encode()).hexdigest()[:12]
        self.identity = f"builtin:{digest}:fullname={self.fullname_prob}"

    def rewrite(self, requests: list[RewriteRequest]) -> list[str]:
        return [self.rewrite_one(r) for r in requests]

    def embed(self, texts: list[str]) -> None:
        return None

    def rewrite_one(self, req: RewriteRequest) -> str:
        rng = random.Random(req.seed)
        if req.kind == "math":
            return render_math(req.style, parse_math(req.chunk, req.doc_id), rng)
        st = KNOWLEDGE.get(req.style)
        if st is None:
            raise K2Error(f"the builtin backend has no knowledge style '{req.style}'", f"use one of: {', '.join(KNOWLEDGE)}")
        bio = parse_bio(req.chunk, req.doc_id)
        name = bio.name or name_in(req.context)
        if name is None:
            raise refuse(req.doc_id, "the chunk says 'he' or 'she' but no earlier text names the person")
        gender = bio.gender or gender_in(req.context)
        first = not req.context.strip()
        return render_facts(st, bio.facts, Subject(name, gender), rng, first, first or bio.name is not None,
                            self.fullname_prob)
