"""Training rows for context extension and mid-training: the corpus, long documents, retrieval, needles, copying.

Five sources, mixed by the recipe's fractions into one set of [N, seq_len + 1] rows (k2 extend-context at
the new length; k2 pretrain with a data.mix, e.g. the tiny chain's mid-training at the original length):

  * corpus     — the pre-training corpus packed at the training sequence length (same held-out
                 split as the pretrain run, so evaluation stays on unseen documents);
  * long_docs  — one long document per row: registers of the synthetic world's people (or,
                 without a world, of corpus documents), each entry with a random badge number,
                 each register closed by an index repeating names and badges in order — verbatim
                 long-range repetition (off in the tiny recipe: retrieval and needle rows teach
                 copying faster);
  * retrieval  — key-value facts ("The code of Anna Avery Berg is 48213.") hidden between
                 training documents, asked for at the end ("What is the code of Anna Avery Berg?
                 The code of Anna Avery Berg is 48213."). The distance between fact and question
                 spans the whole row. The random codes themselves are masked out of the loss where
                 they first appear (nothing can predict them); their repetition in the answer is trained.
  * needles    — one to three facts about plain-word subjects ("The quiet vault number is 97782.")
                 hidden at random depths of a haystack that is either training documents or one
                 short passage of plain sentences repeated ("The lamp is bright. The door is old.
                 So it goes."), every fact asked at the end. With a small vocabulary such subjects
                 are spelt in word fragments and such a haystack repeats the same fragments
                 hundreds of times: a model that learned to retrieve only by matching whole-word
                 names fails there, and so it failed on the passkey probe (docs/extend-context.md).
                 The probe's own words and sentences (pass key, grass, sky, sun, the colours, "Here
                 we go.") are never used, so the passkey suite measures transfer, not a memorised prompt.
  * copy       — a list of random 5-digit codes, training documents, then the same list again
                 ("Codes: 48213 77120 ... Again: 48213 77120 ..."), the repetition being the only
                 loss target: the densest verbatim-copying signal.

Every choice flows from the seed: rows are a pure function of (corpus, world, tokenizer, recipe).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from k2cli.data.packing import PackedData, epoch_order
from k2cli.errors import K2Error

SOURCES = ("corpus", "long_docs", "retrieval", "copy", "needles")

FACT = "The code of {subject} is {code}."
COPY_HEAD, COPY_AGAIN = "Codes:", "\nAgain:"
QUERY = "What is the code of {subject}? The code of {subject} is"


@dataclass
class LongDataConfig:
    input: str = ""  # the corpus; "" = the one the model was pre-trained on (found in its lineage)
    text_field: str = "text"
    val_fraction: float = 0.05  # only with an explicit input: from the lineage the pretrain split is reused
    world: str = ""  # dataset artifact (or world.json) for long documents and fact subjects; "" = the corpus's
    rows: int = 0  # training rows in the mix; 0 = train.steps * train.batch_size (each row seen about once)
    mix: dict[str, float] = field(default_factory=lambda: {"corpus": 0.2, "retrieval": 0.3, "needles": 0.3, "copy": 0.2})
    facts: int = 4  # key-value facts hidden in each retrieval row
    queries: int = 6  # questions per retrieval row, each after its fact; the last one closes the row
    needles: int = 3  # most facts hidden in one needle row (1 to this many, all asked at the end)
    answers_only: bool = True  # retrieval rows train only on the answers (the filler is the corpus: trained elsewhere)

    def validate(self):
        for k, v in self.mix.items():
            if k not in SOURCES:
                raise K2Error(f"unknown long-context source '{k}' in data.mix", f"valid: {', '.join(SOURCES)}")
            if v < 0:
                raise K2Error(f"data.mix.{k} must be >= 0, got {v}", "use non-negative fractions")
        if sum(self.mix.values()) <= 0:
            raise K2Error("data.mix gives every source weight 0", "e.g. data.mix={corpus=0.2, retrieval=0.3, needles=0.3, copy=0.2}")
        if self.facts < 1 or self.queries < 1:
            raise K2Error(f"data.facts={self.facts}, data.queries={self.queries}: a retrieval row needs at least one of each",
                          "e.g. data.facts=4, data.queries=6")
        if self.needles < 1:
            raise K2Error(f"data.needles={self.needles}: a needle row hides at least one fact",
                          "e.g. data.needles=3, or data.mix.needles=0 for no needle rows")
        if self.rows < 0:
            raise K2Error(f"data.rows must be >= 0, got {self.rows}", "0 = train.steps x train.batch_size")
        if not 0 <= self.val_fraction < 1:
            raise K2Error(f"data.val_fraction={self.val_fraction} must be in [0, 1)", "e.g. 0.05")


def find_world(cfg: LongDataConfig, data_art):
    """The synthetic world for long documents and fact subjects: data.world, else the corpus's own, else None."""
    from k2cli.data.world import WORLD_FILE, load_world

    if cfg.world:
        return load_world(cfg.world)
    if data_art is not None and data_art.has(WORLD_FILE):
        return load_world(data_art.path)
    return None


def source_counts(mix: dict[str, float], rows: int) -> dict[str, int]:
    """Rows per source: fractions normalised, rounded, the remainder given to the largest."""
    total = sum(mix.get(s, 0.0) for s in SOURCES)
    counts = {s: int(mix.get(s, 0.0) / total * rows) for s in SOURCES}
    if rows - sum(counts.values()):
        counts[max(SOURCES, key=lambda s: mix.get(s, 0.0))] += rows - sum(counts.values())
    return counts


# ----------------------------------------------------------------------------- long documents


def register_section(tokenizer, title: str, entries: list[tuple[str, str]], rng: random.Random) -> tuple[list[int], list[bool]]:
    """A register: numbered entries, each with a random 5-digit badge, then an index that repeats
    every name with its badge in the same order (how registers, tables of contents and summaries
    restate what came before). The badges are unpredictable where they first appear (not loss
    targets); in the index they can only be copied: dense, verbatim long-range copying, the
    circuit (induction) that retrieval at any distance is built from."""
    codes = [rng.randint(10000, 99999) for _ in entries]
    ids, mask = [], []

    def add(text: str, target: bool = True):
        t = tokenizer.encode(text)
        ids.extend(t)
        mask.extend([target] * len(t))

    add(title)
    for k, ((name, details), code) in enumerate(zip(entries, codes), 1):
        add(f"\nEntry {k}: {name}, badge")
        add(f" {code}", target=False)
        add(f", {details}." if details else ".")
    add("\nBadge index:")
    for (name, _), code in zip(entries, codes):
        add(f" {name} {code};")
    return ids, mask


def long_document(world, docs: list[list[int]], tokenizer, n_tokens: int, rng: random.Random) -> tuple[list[int], list[bool]]:
    """Register sections until the document has n_tokens tokens: people of the synthetic world
    with their employer and studies, or, without a world, training documents of the corpus."""
    ids: list[int] = []
    mask: list[bool] = []
    while len(ids) < n_tokens:
        k = rng.randint(4, 10)
        if world is not None:
            org = rng.choice(world.companies)
            people = rng.sample(world.people, min(k, len(world.people)))
            title = f"Visitor badge register of {org.name}, {world.city(org.hq_city_id).name}."
            entries = []
            for p in people:
                a = world.attributes(p)
                entries.append((p.name, f"studied {a['major']} at {a['university']}, works in {a['employer_city']}"))
        else:
            title = "Register of documents."
            entries = [(f"record {rng.randint(100, 999)}", tokenizer.decode(docs[rng.randrange(len(docs))][:48]).strip().rstrip("."))
                       for _ in range(k)]
        sec_ids, sec_mask = register_section(tokenizer, ("\n\n" if ids else "") + title, entries, rng)
        ids += sec_ids
        mask += sec_mask
    return ids[:n_tokens], mask[:n_tokens]


# ----------------------------------------------------------------------------- retrieval rows


def fact_subjects(world, rng: random.Random, n: int) -> list[str]:
    if world is not None:
        return [p.name for p in rng.sample(world.people, min(n, len(world.people)))] + \
               [f"locker {rng.randint(100, 999)}" for _ in range(max(0, n - len(world.people)))]
    subjects: set[str] = set()
    while len(subjects) < n:
        subjects.add(f"locker {rng.randint(100, 999)}")
    return sorted(subjects, key=lambda _: rng.random())


def retrieval_row(docs: list[list[int]], tokenizer, world, seq_len: int, n_facts: int, n_queries: int,
                  rng: random.Random, answers_only: bool = False) -> tuple[list[int], list[bool]] | None:
    """[EOT] docs, facts and questions interleaved; the row ends with a question and its answer.

    Each question comes after the fact it asks about, at a random later place, so the distance
    from question to fact takes every value up to the row length; the last question closes the
    row. Many questions per row make the copy signal dense (a tiny model needs that to learn
    in-context retrieval in minutes). With `answers_only` only the answers (the code and the
    name repeated in "The code of X is") are loss targets. Returns (ids, loss mask) of
    seq_len + 1 tokens, or None when the facts and questions alone do not fit."""
    nl = tokenizer.encode("\n")
    subjects = fact_subjects(world, rng, n_facts)
    codes = [rng.randint(10000, 99999) for _ in subjects]
    facts = []  # (ids, mask): the code's first appearance is unpredictable, so it is not a target
    for s, c in zip(subjects, codes):
        before = tokenizer.encode("\n" + FACT.format(subject=s, code="").rsplit(" ", 1)[0])
        code = tokenizer.encode(f" {c}")
        after = tokenizer.encode(".\n")
        facts.append((before + code + after, [not answers_only] * len(before) + [False] * len(code) + [not answers_only] * len(after)))
    questions = []
    for i in range(n_facts):
        ask, answer = QUERY.format(subject=subjects[i]).split("? ")
        ask = tokenizer.encode("\n" + ask + "?")
        answer = tokenizer.encode(" " + answer + f" {codes[i]}.")
        questions.append((ask + answer, [not answers_only] * len(ask) + [True] * len(answer)))
    # events on [0, 1): facts anywhere, each question after its fact; the last question at the very end
    fact_at = [rng.random() for _ in range(n_facts)]
    asked = [rng.randrange(n_facts) for _ in range(n_queries)]
    events = [(fact_at[i], 0, i) for i in range(n_facts)]
    events += [(fact_at[i] + (1 - fact_at[i]) * rng.random(), 1, i) for i in asked[:-1]]
    events.sort()
    last = asked[-1]
    fixed = 1 + sum(len(f[0]) for f in facts) + sum(len(questions[i][0]) for i in asked)
    budget = seq_len + 1 - fixed
    if budget < len(events) + 1:
        return None
    # filler: whole training documents separated by newlines, the last one cut to fit exactly
    filler: list[list[int]] = []
    n = 0
    while n < budget:
        d = docs[rng.randrange(len(docs))]
        filler.append(d[: budget - n])
        n += len(filler[-1])
        if n < budget:
            filler.append(nl[: budget - n])
            n += len(filler[-1])
    # an event at place p goes in front of the first filler piece that starts at or after p * budget
    starts = np.cumsum([0] + [len(f) for f in filler[:-1]]) / budget
    ids, mask = [tokenizer.eot_id], [not answers_only]
    k = 0
    for j, piece in enumerate(filler + [[]]):
        while k < len(events) and (j == len(filler) or events[k][0] <= starts[j]):
            _, kind, i = events[k]
            seg, seg_mask = facts[i] if kind == 0 else questions[i]
            ids += seg
            mask += seg_mask
            k += 1
        ids += piece
        mask += [not answers_only] * len(piece)
    ids += questions[last][0]
    mask += questions[last][1]
    assert len(ids) == seq_len + 1, (len(ids), seq_len + 1)
    return ids, mask


# ----------------------------------------------------------------------------- copy rows


def copy_row(docs: list[list[int]], tokenizer, seq_len: int, rng: random.Random, answers_only: bool = True) -> tuple[list[int], list[bool]]:
    """[EOT] "Codes: c1 ... ck." filler "Again: c1 ... ck." — seq_len + 1 tokens, ids and loss mask.

    k (2 to 8 codes) and the filler's length (0 to the whole row, skewed short: room x u^2) are
    drawn per row, so the copying distance spans the row. The first list is unpredictable (never
    a target); the repetition is (with `answers_only`, only it)."""
    T = seq_len + 1
    while True:
        codes = " " + " ".join(str(rng.randint(10000, 99999)) for _ in range(rng.randint(2, 8))) + "."
        first = tokenizer.encode(COPY_HEAD) + tokenizer.encode(codes)
        again = tokenizer.encode(COPY_AGAIN) + tokenizer.encode(codes)
        room = T - 1 - len(first) - len(again)
        if room >= 0:
            break
    n_filler = int(room * rng.random() ** 2)  # mostly short distances (where copying is learned first), up to the row
    filler: list[int] = []
    while len(filler) < n_filler:
        filler += tokenizer.encode("\n") + docs[rng.randrange(len(docs))]
    filler = filler[:n_filler]
    tail = T - 1 - len(first) - n_filler - len(again)  # after the repetition: more documents, trained as text
    after: list[int] = []
    while len(after) < tail:
        after += tokenizer.encode("\n") + docs[rng.randrange(len(docs))]
    after = after[:tail]
    ids = [tokenizer.eot_id] + first + filler + again + after
    mask = [not answers_only] * (1 + len(first) + n_filler) + [True] * len(again) + [not answers_only] * tail
    mask[1 : 1 + len(first)] = [False] * len(first)  # the first list: nothing can predict it
    return ids, mask


# ----------------------------------------------------------------------------- needle rows

# Plain words for needle rows. Subjects ("the brass door code") are two or three of them, so that
# with a small vocabulary they are spelt in word fragments, as the probe's "pass key" is; the
# passages are short plain sentences repeated, like the probe's filler. The passkey probe's own
# words (pass, key, grass, sky, sun, green, blue, yellow) and sentences ("Here we go.", "There and
# back again.") are left out, so the passkey suite still measures transfer to wording never trained on.
NEEDLE_NOUNS = ("door", "gate", "box", "safe", "lock", "vault", "room", "case", "bag", "desk", "card", "phone",
                "locker", "garden", "tower", "river", "bridge", "train", "boat", "lamp", "clock", "radio", "window",
                "table", "chair", "cart", "bell", "flag", "road", "hill", "lake", "field", "stone", "tree", "bird",
                "horse", "fish", "apple", "bread", "milk", "coat", "shoe", "hat", "ring", "cup", "plate", "wall")
NEEDLE_ADJECTIVES = ("red", "white", "black", "brown", "silver", "golden", "small", "large", "old", "new", "quiet",
                     "bright", "dark", "cold", "warm", "round", "tall", "short", "soft", "heavy", "light", "long",
                     "empty", "full", "clean", "wet", "dry", "fast", "slow", "open", "closed", "sweet")
NEEDLE_NAMES = ("code", "number", "word", "pin", "secret", "combination", "signal", "token", "password", "id")
NEEDLE_FACTS = ("The {subject} is {code}.",
                "Note that the {subject} is {code}. Keep {code} in mind.",
                "{code} is the {subject}. The {subject} is {code}.")
NEEDLE_QUESTION = "What is the {subject}? The {subject} is"


def needle_subject(rng: random.Random) -> str:
    words = [rng.choice(NEEDLE_NOUNS), rng.choice(NEEDLE_NAMES)]
    if rng.random() < 0.5:
        words.insert(0, rng.choice(NEEDLE_ADJECTIVES))
    return " ".join(words)


def needle_passage(rng: random.Random) -> str:
    """Three to six short sentences ("The lamp is bright. The door is old. So it goes."), repeated as filler."""
    sentences = [f"The {rng.choice(NEEDLE_NOUNS)} is {rng.choice(NEEDLE_ADJECTIVES)}." for _ in range(rng.randint(2, 5))]
    sentences.append(rng.choice(("So it goes.", "On and on.", "Day after day.", "Now and then.", "All is well.")))
    return " ".join(sentences) + " "


def needle_row(docs: list[list[int]], tokenizer, seq_len: int, rng: random.Random, max_needles: int = 3,
               answers_only: bool = True) -> tuple[list[int], list[bool]]:
    """[EOT] haystack with 1..max_needles facts at random depths, then every question with its answer.

    The haystack is, half the time, one short passage of plain sentences repeated (the passkey
    probe's kind of filler: the same words hundreds of times, few of them informative) and
    otherwise training documents. Subjects are distinct, so a question can only be answered by
    matching its subject; only the answers are loss targets with `answers_only`."""
    T = seq_len + 1
    n = rng.randint(1, max_needles)
    subjects: list[str] = []
    while len(subjects) < n:
        s = needle_subject(rng)
        if all(s not in t and t not in s for t in subjects):
            subjects.append(s)
    codes = [rng.randint(10000, 99999) for _ in subjects]
    facts = [tokenizer.encode("\n" + rng.choice(NEEDLE_FACTS).format(subject=s, code=c) + "\n") for s, c in zip(subjects, codes)]
    qa_ids, qa_mask = [], []
    for i in rng.sample(range(n), n):
        ask = tokenizer.encode("\n" + NEEDLE_QUESTION.format(subject=subjects[i]))
        answer = tokenizer.encode(f" {codes[i]}.")
        qa_ids += ask + answer
        qa_mask += [not answers_only] * len(ask) + [True] * len(answer)
    n_hay = T - 1 - sum(len(f) for f in facts) - len(qa_ids)
    if n_hay < n + 1:
        raise K2Error(f"train.seq_len={seq_len} is too short for a needle row", "raise train.seq_len or set data.mix.needles=0")
    hay: list[int] = []
    if rng.random() < 0.5:
        unit = tokenizer.encode(needle_passage(rng))
        hay = unit * (n_hay // len(unit) + 1)
    else:
        while len(hay) < n_hay:
            hay += tokenizer.encode("\n") + docs[rng.randrange(len(docs))]
    hay = hay[:n_hay]
    cuts = sorted(rng.randrange(n_hay + 1) for _ in facts)
    ids, mask, at = [tokenizer.eot_id], [not answers_only], 0
    for cut, fact in zip(cuts, facts):
        ids += hay[at:cut] + fact
        mask += [not answers_only] * (cut - at) + [False] * len(fact)  # never a target: its code is unpredictable
        at = cut
    ids += hay[at:] + qa_ids
    mask += [not answers_only] * (n_hay - at) + qa_mask
    assert len(ids) == T, (len(ids), T)
    return ids, mask


# ----------------------------------------------------------------------------- the mix


@dataclass
class LongData:
    train: PackedData
    val: PackedData
    counts: dict  # rows per source
    n_docs: int
    unigram_entropy: float


def build_long_context_data(lm, train_docs: list[list[int]], tokenizer, world, seq_len: int, cfg: LongDataConfig,
                            rows: int, seed: int) -> LongData:
    """Mix `rows` training rows: packed corpus rows (from `lm`, an LMData at seq_len), long
    documents and retrieval rows; validation stays the corpus's held-out rows."""
    counts = source_counts(cfg.mix, rows)
    T = seq_len + 1
    parts, masks = [], []
    rng = random.Random(f"long-context:{seed}")
    if counts["corpus"]:
        n_c = len(lm.train)
        reps = -(-counts["corpus"] // n_c)
        # corpus rows of `reps` epochs, each epoch re-packed and re-shuffled (data/packing.py)
        idx = np.concatenate([e * n_c + epoch_order(n_c, seed, e) for e in range(reps)])[: counts["corpus"]]
        parts.append(lm.train.token_rows(idx))
        masks.append(np.ones((len(idx), T), dtype=bool))
    if counts["long_docs"]:
        docs, doc_masks = [], []
        for _ in range(counts["long_docs"]):
            body, body_mask = long_document(world, train_docs, tokenizer, T - 1, rng)
            docs.append([tokenizer.eot_id] + body)
            doc_masks.append([True] + body_mask)
        parts.append(np.asarray(docs, dtype=np.int32))
        masks.append(np.asarray(doc_masks, dtype=bool))
    if counts["retrieval"]:
        ids, mask = [], []
        for _ in range(counts["retrieval"]):
            r = None
            # long names can make many facts and questions overflow a row: then ask fewer, hide fewer
            for n_f, n_q in [(cfg.facts, q) for q in range(cfg.queries, 0, -1)] + [(f, 1) for f in range(cfg.facts - 1, 0, -1)]:
                r = retrieval_row(train_docs, tokenizer, world, seq_len, n_f, n_q, rng, cfg.answers_only)
                if r is not None:
                    break
            if r is None:
                raise K2Error(f"train.seq_len={seq_len} is too short for even one fact and one question per retrieval row",
                              "raise train.seq_len or set data.mix.retrieval=0")
            ids.append(r[0])
            mask.append(r[1])
        parts.append(np.asarray(ids, dtype=np.int32))
        masks.append(np.asarray(mask, dtype=bool))
    generated = {"copy": lambda: copy_row(train_docs, tokenizer, seq_len, rng, cfg.answers_only),
                 "needles": lambda: needle_row(train_docs, tokenizer, seq_len, rng, cfg.needles, cfg.answers_only)}
    for source, make_row in generated.items():  # (ids, mask) rows, in this fixed order so the rng stream is stable
        if counts[source]:
            made = [make_row() for _ in range(counts[source])]
            parts.append(np.asarray([r[0] for r in made], dtype=np.int32))
            masks.append(np.asarray([r[1] for r in made], dtype=bool))
    tokens = np.concatenate(parts)
    mask = np.concatenate(masks)
    return LongData(train=PackedData(tokens, mask if not mask.all() else None), val=lm.val, counts=counts,
                    n_docs=lm.n_docs, unigram_entropy=lm.unigram_entropy)
