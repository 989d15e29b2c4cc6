"""The prompt library: styles and perspectives a rewrite is asked for, and the messages a model gets.

K2 (section 2.2) rephrases knowledge with "style- and perspective-diverse prompting": the same
facts told as an encyclopedia entry, a news item, an interview, a timeline, ... Each rewrite of a
document samples one style; the rewrites of one document get different styles while there are
enough. Math documents get "learning-note" styles instead (SwallowMath): the problem restated with
its context, a concise step-by-step solution, a clearly marked final answer.

Every backend sees the same request. Model backends read `messages` (built here, in one place);
the builtin backend reads the structured fields and writes each style from its own templates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from k2cli.errors import K2Error, did_you_mean


@dataclass(frozen=True)
class Style:
    name: str
    kind: str  # "knowledge" | "math"
    instruction: str


STYLES: dict[str, Style] = {s.name: s for s in [
    Style("encyclopedic", "knowledge",
          "Rewrite the text as a neutral encyclopedia entry: third person, full sentences, no opinions."),
    Style("news", "knowledge",
          "Rewrite the text as a short news report in the third person, attributing facts to records or colleagues."),
    Style("interview", "knowledge",
          "Rewrite the text as an interview transcript: an Interviewer asks questions and the person answers in the "
          "first person. Start every line with the speaker's name and a colon."),
    Style("timeline", "knowledge",
          "Rewrite the text as a chronological timeline of the person's life: a title line, then one event per line, "
          "each starting with '- '."),
    Style("first_person", "knowledge",
          "Rewrite the text as the person's own account of their life, in the first person."),
    Style("qa", "knowledge",
          "Rewrite the text as questions and answers, one pair per line written 'Q: ... A: ...'. Every question "
          "names the person in full."),
    Style("colleague", "knowledge",
          "Rewrite the text as a colleague introducing the person: the colleague speaks in the first person about "
          "them in the third person."),
    Style("resume", "knowledge",
          "Rewrite the text as a curriculum vitae: a title line with the person's name, then one 'Label: value' line "
          "per fact."),
    Style("learning_note", "math",
          "Rewrite the math document as a learning note: restate the problem with its context (what is given, what "
          "is asked), then a concise numbered step-by-step solution with every calculation written out, then the "
          "final answer on its own line as 'Final answer: N'."),
    Style("study_card", "math",
          "Rewrite the math document as a study card: 'Question:' (what is asked), 'Given:' (the facts as a list), "
          "'Worked steps:' (numbered, concise, every calculation written out), then 'Final answer: N'."),
    Style("tutor", "math",
          "Rewrite the math document as a tutor explaining it to a student: say what is asked and what is known, "
          "walk through each calculation concisely, and end with 'Final answer: N' on its own line."),
]}

KNOWLEDGE_STYLES = [s.name for s in STYLES.values() if s.kind == "knowledge"]
MATH_STYLES = [s.name for s in STYLES.values() if s.kind == "math"]

SYSTEM_PROMPT = (
    "You rewrite documents for a language-model pre-training corpus. Keep every fact exactly as in the source: "
    "names, dates, numbers, places, organisations, and which fact belongs to whom. Write dates and numbers with "
    "digits. Do not add facts. Do not repeat the text that is already rewritten. Output only the rewritten text."
)
CONTEXT_HEADER = "Already rewritten (continue after it, do not repeat it):"
NO_CONTEXT = "(nothing yet: this is the start of the document)"
CHUNK_HEADER = "Text to rewrite:"


def check_styles(names: list[str], kind: str) -> list[str]:
    """Validate a recipe's style list for documents of `kind`."""
    if not names:
        raise K2Error(f"no {kind} styles given", f"list some of: {', '.join(s for s in STYLES if STYLES[s].kind == kind)}")
    for n in names:
        if n not in STYLES:
            raise K2Error(f"unknown rephrasing style '{n}'", did_you_mean(n, STYLES))
        if STYLES[n].kind != kind:
            raise K2Error(f"style '{n}' is a {STYLES[n].kind} style, listed among the {kind} styles",
                          f"move it to the {STYLES[n].kind} list")
    return names


def sample_styles(names: list[str], n: int, rng: random.Random) -> list[str]:
    """Styles for the n rewrites of one document: all different while there are enough, then cycling
    through fresh shuffles."""
    out: list[str] = []
    while len(out) < n:
        batch = list(names)
        rng.shuffle(batch)
        out += batch
    return out[:n]


def build_messages(style: str, chunk: str, context: str) -> list[dict]:
    """The chat messages that ask a model for one chunk's rewrite, given the rewritten text before it."""
    user = (f"Style: {STYLES[style].instruction}\n\n{CONTEXT_HEADER}\n{context.strip() or NO_CONTEXT}\n\n"
            f"{CHUNK_HEADER}\n{chunk.strip()}")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
