"""`knowledge-probe`: what a BASE model knows about the world's people, scored without any fine-tuning.

Physics of Language Models 3.1 asks whether pre-training stored a fact in an extractable form; its
QA probe needs a QA fine-tune, which can fail on its own (then every model scores the floor and the
comparison says nothing). This probe needs no fine-tune: for every (person, attribute) of the world
it writes a sentence that ends just before the attribute's value, in PHRASINGS THAT NO TRAINING TEXT
USES (HELD_OUT below; tests/test_knowledge_probe.py proves that none of their word trigrams occurs in
the biography templates, the QA questions or any style of the builtin rewriter), and scores the gold
value as the continuation:

    logprob        log P(value | prompt), summed over the value's tokens (teacher-forced); and per token
    exact          greedy decoding from the prompt would write the value: every value token is the argmax
                   given the gold tokens before it (greedy decoding feeds back its own argmax, so it
                   reproduces the value exactly when, and only when, the teacher-forced argmax is right at
                   every position: one forward pass gives the greedy result)
    token_acc      the fraction of value tokens that are the argmax ("attribute-token recall")

One forward pass per batch of prompts scores all three. The prompt starts with the end-of-text token,
as a document does after packing. People are the world's (world.json of the dataset), reported
separately for the QA-train people (`train_*`: those a QA fine-tune would see) and the QA-test people
(`test_*`); `eval.max_examples` caps the people per split (a seeded subset, kept in world order), so
two models evaluated with the same seed get the same people and the same prompts in the same order.
Every scored example goes into a JSON-lines file of the eval artifact (`knowledge-probe.<label>.jsonl`,
listed under the suite's `files` in results.json), so a comparison can pair models example by example.
"""

from __future__ import annotations

import json
import re

import numpy as np
import torch

from k2cli.data.world import ATTRIBUTES
from k2cli.eval.knowledge import load_split
from k2cli.eval.suite import SuiteResult, register
from k2cli.model.precision import compute_dtype, inference_dtype

# Two held-out phrasings per attribute. {N} is the full name; the attribute's slot ends the template
# (the prompt is everything before it). Unusual on purpose: they must share no word trigram with any
# text a model of this project trains on (tests/test_knowledge_probe.py checks it).
HELD_OUT: dict[str, list[str]] = {
    "birth_date": [
        "Ask the archives about the first day of {N} and they will answer {birth_date}",
        "A calendar kept by the parents of {N} circles {birth_date}",
    ],
    "birth_city": [
        "The town printed on the birth certificate of {N} reads {birth_city}",
        "Trace {N} back to the cradle and you arrive at {birth_city}",
    ],
    "university": [
        "The diploma hanging on the wall of {N} carries the seal of {university}",
        "Old classmates of {N} remember the lecture halls of {university}",
    ],
    "major": [
        "The subject named on the diploma of {N} reads {major}",
        "Old classmates of {N} recall the long exams in {major}",
    ],
    "employer": [
        "The monthly paycheck of {N} arrives from {employer}",
        "The badge clipped to the jacket of {N} shows the logo of {employer}",
    ],
    "employer_city": [
        "The monthly paycheck of {N} is mailed to a branch that sits in {employer_city}",
        "On weekday mornings {N} takes the train into downtown {employer_city}",
    ],
}


def prompt_and_value(template: str, name: str, value: str) -> tuple[str, str]:
    """'... of {N} reads {birth_city}' -> ('... of Anna Avery Berg reads', ' Oslo'): the text before the
    attribute slot, and the value with the space that precedes it in running text."""
    head, slot = re.fullmatch(r"(.*) \{(\w+)\}", template).groups()
    assert slot in ATTRIBUTES, template
    return head.replace("{N}", name), " " + value


def examples(world, people: dict[str, list[str]]) -> list[dict]:
    """One example per (split, person, attribute, template), in that order: the unit rows of the probe."""
    rows = []
    for split, ids in people.items():
        for pid in ids:
            p = world.person(pid)
            values = world.attributes(p)
            for attr in ATTRIBUTES:
                for t, template in enumerate(HELD_OUT[attr]):
                    prompt, value = prompt_and_value(template, p.name, values[attr])
                    rows.append({"split": split, "person_id": pid, "attribute": attr, "template": t,
                                 "prompt": prompt, "value": value.strip()})
    return rows


@torch.inference_mode()
def score_values(model, pairs: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int) -> list[tuple[list[float], list[bool]]]:
    """(prompt ids, value ids) -> per value token (log P(token | everything before it), is it the argmax?).

    Rows are prompt + value without the last token, right-padded: attention is causal, so padding after a
    row's last token changes nothing before it (and the MoE routes each token on its own, with no capacity
    limit that padding could use up). logits[t] predicts token t + 1, so the value's n tokens are predicted
    by positions len(prompt) - 1 ... len(prompt) + n - 2.
    """
    device = next(model.parameters()).device
    out: list[tuple[list[float], list[bool]]] = [([], [])] * len(pairs)
    with compute_dtype(model, inference_dtype(model, device, "auto")):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            rows = [p + v for p, v in chunk]
            ids = torch.full((len(rows), max(len(r) for r in rows) - 1), pad_id, dtype=torch.long)
            for b, r in enumerate(rows):
                ids[b, : len(r) - 1] = torch.tensor(r[:-1])
            logp = torch.log_softmax(model(ids.to(device)).float(), dim=-1)  # [B, T, V]
            for b, (p, v) in enumerate(chunk):
                pos = torch.arange(len(p) - 1, len(p) + len(v) - 1, device=device)  # [n]
                target = torch.tensor(v, device=device)  # [n]
                lp = logp[b, pos]  # [n, V]
                out[start + b] = (lp.gather(-1, target[:, None])[:, 0].tolist(), (lp.argmax(-1) == target).tolist())
    return out


def probe_people(ctx):
    """(the world, split -> person ids): the QA-train and QA-test people of the dataset (all people as `all` when it has
    no QA split), at most eval.max_examples per split, a seeded subset in world order."""
    from k2cli.data.world import load_world

    world = load_world(ctx.data_art.path)
    splits = {}
    for split, part in (("train", "qa_train"), ("test", "qa_test")):
        ds = load_split(ctx, part)
        if ds is not None:
            ids = set(ds["person_id"])
            splits[split] = [p.id for p in world.people if p.id in ids]
    if not splits:
        splits = {"all": [p.id for p in world.people]}
    rng = np.random.default_rng(ctx.cfg.seed)
    for split, ids in splits.items():
        keep = set(rng.permutation(ids)[: ctx.cfg.max_examples].tolist())
        splits[split] = [i for i in ids if i in keep]
    return world, splits


def summarise(rows: list[dict], prefix: str) -> dict[str, float]:
    """Means over examples: logprob (sum over the value), logprob_per_token, exact, token_acc."""
    if not rows:
        return {}
    return {f"{prefix}logprob": float(np.mean([r["logprob"] for r in rows])),
            f"{prefix}logprob_per_token": float(np.mean([r["logprob"] / r["tokens"] for r in rows])),
            f"{prefix}exact": float(np.mean([r["exact"] for r in rows])),
            f"{prefix}token_acc": float(np.mean([r["token_acc"] for r in rows]))}


def rows_file(label: str) -> str:
    return "knowledge-probe." + re.sub(r"[^\w.-]+", "_", label) + ".jsonl"


@register
class KnowledgeProbe:
    name = "knowledge-probe"
    description = ("base-model knowledge without SFT: log P(gold value), greedy exact match and value-token recall "
                   "on held-out phrasings, QA-train and QA-test people apart; per-example rows for paired comparisons")

    def applies(self, ctx):
        if ctx.is_chat_model:
            return "a chat model (the probe scores a base model's continuation; use the knowledge suite)"
        if ctx.data_art is None or not (ctx.data_art.path / "world.json").is_file():
            return "no world.json in the dataset (use a 'k2 data synth' lineage or --data)"
        return None

    def run(self, ctx) -> SuiteResult:
        world, people = probe_people(ctx)
        rows = examples(world, people)
        tok = ctx.tokenizer
        prompts = [[tok.eot_id] + tok.encode(r["prompt"]) for r in rows]
        values = tok.encode_batch([" " + r["value"] for r in rows])
        scored = score_values(ctx.model, list(zip(prompts, values)), ctx.cfg.batch_size, tok.eot_id)
        for r, (lps, hits) in zip(rows, scored):
            r.update(logprob=float(sum(lps)), tokens=len(lps), exact=bool(all(hits)), token_acc=float(np.mean(hits)))
        metrics = {}
        for split, ids in people.items():
            mine = [r for r in rows if r["split"] == split]
            metrics |= summarise(mine, f"{split}_") | {f"{split}_people": len(ids)}
            for attr in ATTRIBUTES:
                metrics |= summarise([r for r in mine if r["attribute"] == attr], f"{split}_{attr}_")
        path = ctx.out_dir / rows_file(ctx.label)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        n = {s: len(v) for s, v in people.items()}
        return SuiteResult(metrics=metrics, rows=rows[:20], files=[path],
                           notes=[f"{len(rows)} examples ({n} people x {len(ATTRIBUTES)} attributes x 2 held-out phrasings), "
                                  "teacher-forced; exact = greedy decoding writes the value"])
