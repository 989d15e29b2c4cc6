#!/usr/bin/env python
"""Which part of the passkey prompt breaks retrieval? The grid behind docs/extend-context.md.

    python reproduce/retrieval_probe.py MODEL [MODEL ...] [--data REF] [--lengths 128,256,512,1024]

A key hidden at depths 0.1-0.9 of a prompt of each length, in 2 x 2 variants:

    filler:  "grass"   the passkey suite's five sentences, repeated (few distinct tokens, many repeats)
             "corpus"  held-out documents of the data artifact (default rephrase:latest)
    wording: "passkey" "The pass key is K. Remember it. K is the pass key." ... "The pass key is"
             "code"    "The code of Anna Avery Berg is K." ... "The code of Anna Avery Berg is"

For each cell: the share of prompts whose answer " K." is predicted exactly, token by token,
teacher-forced (argmax at every answer position; close to greedy accuracy), and the mean loss
of the five digits (chance: ln 10 = 2.3 nats). A model that retrieves only by matching whole-word
names does well on "code" and fails on "passkey", whose words the tiny tokenizer spells in
fragments that the grass filler repeats ("pass" = p-as-s, "grass" = g-r-as-s).
"""

from __future__ import annotations

import argparse
import random
import sys

import torch
import torch.nn.functional as F

from k2cli.data.loading import load_corpus
from k2cli.data.tokenizer import load_tokenizer
from k2cli.errors import K2Error
from k2cli.eval.passkey import FILLER, KEY_LINE, QUESTION
from k2cli.model.io import load_model

WORDINGS = {
    "passkey": ("\n" + KEY_LINE + "\n", "\n" + QUESTION),
    "code": ("\nThe code of Anna Avery Berg is {key}.\n", "\nWhat is the code of Anna Avery Berg? The code of Anna Avery Berg is"),
}
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


@torch.no_grad()
def cell(model, tok, filler, wording: str, length: int, trials: int, seed: int) -> tuple[float, float]:
    """(share of prompts answered exactly, mean digit loss) for one filler x wording x length."""
    rng = random.Random(f"{seed}:{wording}:{length}")
    line_fmt, question = WORDINGS[wording]
    rows, n_answer = [], 0
    for t in range(trials):
        key = rng.randint(10000, 99999)
        line, q, answer = tok.encode(line_fmt.format(key=key)), tok.encode(question), tok.encode(f" {key}.")
        n = length - 1 - len(line) - len(q)
        before = int(DEPTHS[t % len(DEPTHS)] * n)
        rows.append([tok.eot_id] + filler(before, rng) + line + filler(n - before, rng) + q + answer)
        n_answer = len(answer)
    x = torch.tensor(rows)
    logits = model(x[:, :-1]).float()[:, -n_answer:]
    target = x[:, 1:][:, -n_answer:]
    exact = (logits.argmax(-1) == target).all(1).float().mean()
    loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")[:, 1:-1]  # the digits: not " " and "."
    return float(exact), float(loss.mean())


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", default="rephrase:latest", help="dataset artifact whose last documents fill the 'corpus' prompts")
    ap.add_argument("--lengths", default="128,256,512,1024")
    ap.add_argument("--trials", type=int, default=20)
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    try:
        ds, _ = load_corpus(args.data)
        texts = ds["text"][-400:]
        for ref in args.models:
            model, art = load_model(ref)
            model.eval()
            tok = load_tokenizer(art.path)
            corpus = [t for text in texts for t in tok.encode("\n" + text)]
            grass = tok.encode((FILLER + " ") * (max(lengths) // 8))
            fillers = {
                "grass": lambda n, rng: grass[:n],
                "corpus": lambda n, rng: (lambda s: corpus[s : s + n])(rng.randrange(len(corpus) - n)),
            }
            print(f"\n{art.id}: answered exactly (digit loss, nats), {args.trials} prompts per cell\n")
            print("| filler | wording | " + " | ".join(str(L) for L in lengths) + " |")
            print("|---|---|" + "---:|" * len(lengths))
            for fname, filler in fillers.items():
                for wording in WORDINGS:
                    cells = [cell(model, tok, filler, wording, L, args.trials, 0) for L in lengths]
                    print(f"| {fname} | {wording} | " + " | ".join(f"{100 * e:.0f}% ({l:.1f})" for e, l in cells) + " |")
    except K2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
