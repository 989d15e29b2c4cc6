"""Fidelity verification: does a rewritten chunk still say everything its source chunk said?

K2 checks the semantic alignment of every rewritten segment with its source and rejects failures.
We check facts exactly and similarity where a backend can embed:

* facts of the source chunk — dates, clock times, numbers, and entities (people, organisations,
  places, majors) — must all appear in the rewrite. Dates are compared as dates ("October 2, 1996"
  = "2 October 1996" = "1996-10-02"), numbers as values ("9,416,220" = "9416220"; "twelve" = 12);
* the rewrite must not bring in facts that are nowhere in the source document: a date, time or
  number it does not contain (list markers like "1." or "Step 2:" are not facts), or an entity of
  the world it does not mention. A changed employer is both: the old one is missing and the new
  one is invented;
* a rewrite that is empty or just the source again is not a rewrite;
* a cosine similarity of source and rewrite embeddings is recorded when the backend offers
  embeddings, and below `min_similarity` it fails the chunk.

Entities come from the world's lexicon (world.json) when the input has one: exact and complete.
Without a world, proper nouns are guessed: runs of capitalised words, minus function words and a
lone capitalised word at the start of a sentence (which may be an ordinary word). Only the
lexicon is trusted to detect invented entities.

What this cannot see: facts swapped between roles (born in A / works in B told the other way
round) keep every entity and number; the similarity score is the signal for that.
"""

from __future__ import annotations

import calendar
import functools
import math
import re
from dataclasses import dataclass, field

from k2cli.data.rephrase.chunking import sentence_spans

MONTHS = {m.lower(): i for i, m in enumerate(calendar.month_name) if m} | {
    m.lower(): i for i, m in enumerate(calendar.month_abbr) if m}
_MONTH = r"(?:" + "|".join(sorted((m for m in MONTHS), key=len, reverse=True)) + r")\.?"
_DATE_MDY = re.compile(rf"\b({_MONTH}) (\d{{1,2}}),? (\d{{4}})\b", re.I)
_DATE_DMY = re.compile(rf"\b(\d{{1,2}}) ({_MONTH}),? (\d{{4}})\b", re.I)
_DATE_ISO = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
_TIME = re.compile(r"\b([01]?\d|2[0-3]):([0-5]\d)\b")
_NUMBER = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?![\d,])|\d+(?:\.\d+)?")
_LIST_MARKER = re.compile(r"(?im)^[ \t]*(?:[-*][ \t]*)?(?:step[ \t]+)?\d{1,2}[.):][ \t]+")
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_CAP_RUN = re.compile(r"[A-Z][\w&-]*(?: (?:of|and|de|la|[A-Z][\w&-]*))*")
FUNCTION_WORDS = set(
    "A An The He She It They We I You His Her Its Their Our My Your This That These Those In On At By For From Of To "
    "With And But Or As After Before When While Since Today Yesterday Q Interviewer Step Final Answer Solution "
    "Problem Given Question Born Name".split()) | {m.capitalize() for m in MONTHS}


@dataclass
class Facts:
    dates: set[str] = field(default_factory=set)  # ISO "1996-10-02"
    times: set[str] = field(default_factory=set)  # "9:00"
    numbers: set[str] = field(default_factory=set)  # normalised digits "9416220"
    entities: set[str] = field(default_factory=set)

    def __len__(self):
        return len(self.dates) + len(self.times) + len(self.numbers) + len(self.entities)

    def allowed_numbers(self) -> set[str]:
        """Numbers a rewrite may write: those of the text, plus the parts of its dates and times."""
        parts = {str(int(x)) for d in self.dates for x in d.split("-")}
        parts |= {str(int(x)) for t in self.times for x in t.split(":")}
        return self.numbers | parts


def _norm_number(s: str) -> str:
    s = s.replace(",", "")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return str(int(s)) if s.isdigit() else s


def _blank(text: str, m: re.Match) -> str:
    return text[: m.start()] + " " * (m.end() - m.start()) + text[m.end():]


def _dates_times_numbers(text: str, facts: Facts) -> None:
    text = _LIST_MARKER.sub(lambda m: " " * len(m.group(0)), text)
    for pattern, order in ((_DATE_MDY, "mdy"), (_DATE_DMY, "dmy"), (_DATE_ISO, "ymd")):
        for m in list(pattern.finditer(text)):
            g = m.groups()
            y, mo, d = ((g[2], g[0], g[1]) if order == "mdy" else (g[2], g[1], g[0]) if order == "dmy" else g)
            month = MONTHS[mo.lower().rstrip(".")] if not mo.isdigit() else int(mo)
            facts.dates.add(f"{int(y):04d}-{month:02d}-{int(d):02d}")
            text = _blank(text, m)
    for m in list(_TIME.finditer(text)):
        facts.times.add(f"{int(m.group(1))}:{m.group(2)}")
        text = _blank(text, m)
    facts.numbers |= {_norm_number(m.group(0)) for m in _NUMBER.finditer(text)}


def _lexicon_entities(text: str, lexicon: set[str], max_words: int) -> set[str]:
    """Lexicon phrases in the capitalised runs of `text`, longest first, without overlaps."""
    found = set()
    for run in _CAP_RUN.finditer(text):
        words = run.group(0).split(" ")
        i = 0
        while i < len(words):
            for n in range(min(max_words, len(words) - i), 0, -1):
                phrase = " ".join(words[i:i + n])
                if phrase in lexicon:
                    found.add(phrase)
                    i += n
                    break
            else:
                i += 1
    return found


def _guessed_entities(text: str) -> set[str]:
    """Proper nouns without a lexicon: capitalised runs, minus leading function words; a lone
    capitalised word opening a sentence is skipped (it may be an ordinary word)."""
    starts = {a for a, _ in sentence_spans(text)}
    found = set()
    for run in _CAP_RUN.finditer(text):
        words = run.group(0).split(" ")
        at_start = run.start() in starts or text[max(0, run.start() - 3):run.start()].strip() in (":", "-", "*")
        while words and words[0] in FUNCTION_WORDS:
            words = words[1:]
            at_start = False
        while words and words[-1] in ("of", "and", "de", "la"):
            words = words[:-1]
        if not words or (len(words) == 1 and at_start):
            continue
        found.add(" ".join(words))
    return found


class FactExtractor:
    """Turns text into Facts; one per run (it holds the lexicon and its longest phrase length)."""

    def __init__(self, lexicon: set[str] | None = None):
        self.lexicon = set(lexicon or ())
        self.max_words = max((len(e.split(" ")) for e in self.lexicon), default=1)
        # a source chunk is checked once per rewrite and retry: remember its facts (never mutated)
        self.cached = functools.lru_cache(maxsize=8192)(self.__call__)

    def __call__(self, text: str) -> Facts:
        facts = Facts()
        _dates_times_numbers(text, facts)
        facts.entities = _lexicon_entities(text, self.lexicon, self.max_words) if self.lexicon else _guessed_entities(text)
        return facts

    def mentions(self, text: str, entity: str) -> bool:
        return re.search(rf"(?<![\w-]){re.escape(entity)}(?![\w-])", text) is not None


@dataclass
class Verdict:
    ok: bool
    reason: str  # "pass" | "empty" | "unchanged" | "missing_fact" | "invented_fact" | "low_similarity"
    facts: int  # facts of the source chunk that were checked
    missing: list[str] = field(default_factory=list)
    invented: list[str] = field(default_factory=list)
    similarity: float | None = None


def _squash(text: str) -> str:
    return " ".join(text.split()).lower()


def verify_chunk(source: str, rewrite: str, document_facts: Facts, extract: FactExtractor,
                 similarity: float | None = None, min_similarity: float = 0.0) -> Verdict:
    """Check one rewritten chunk against its source chunk (and the facts of the whole source document)."""
    src = extract.cached(source)
    n = len(src)
    if not rewrite.strip():
        return Verdict(False, "empty", n, similarity=similarity)
    if _squash(rewrite) == _squash(source):
        return Verdict(False, "unchanged", n, similarity=similarity)
    out = extract(rewrite)
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", rewrite)}
    spelled = {str(NUMBER_WORDS[w]) for w in words if w in NUMBER_WORDS}
    missing = sorted([f"date {d}" for d in src.dates - out.dates]
                     + [f"time {t}" for t in src.times - out.times]
                     + [f"number {x}" for x in src.numbers - out.numbers - spelled]
                     + [f"entity {e}" for e in src.entities if not extract.mentions(rewrite, e)])
    if missing:
        return Verdict(False, "missing_fact", n, missing=missing, similarity=similarity)
    invented = sorted([f"date {d}" for d in out.dates - document_facts.dates]
                      + [f"time {t}" for t in out.times - document_facts.times]
                      + [f"number {x}" for x in out.numbers - document_facts.allowed_numbers()]
                      + ([f"entity {e}" for e in out.entities - document_facts.entities] if extract.lexicon else []))
    if invented:
        return Verdict(False, "invented_fact", n, invented=invented, similarity=similarity)
    if similarity is not None and similarity < min_similarity:
        return Verdict(False, "low_similarity", n, similarity=similarity)
    return Verdict(True, "pass", n, similarity=similarity)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0
