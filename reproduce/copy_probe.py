#!/usr/bin/env python
"""Can a model copy from its context? The measurement behind docs/extend-context.md.

    python reproduce/copy_probe.py MODEL [MODEL ...]     # artifact refs or paths

For each model: the teacher-forced loss of every token of the answer in

    The code of Anna Avery Berg is 48213.
    The code of Tom Lee is 77120.
    What is the code of Anna Avery Berg? The code of Anna Avery Berg is 48213.

(the answer's surname, the number's first token, and each later digit; chance for a digit is
ln 10 = 2.3 nats), the greedy continuation of the question, and the mean pairwise cosine of the
input embeddings of the digits 0-9 and of ten first names and surnames. A model that copies has a
loss near 0 on every answer token; one whose digit embeddings are nearly parallel cannot tell the
digit positions of its context apart.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from k2cli.data.tokenizer import load_tokenizer
from k2cli.errors import K2Error
from k2cli.model.generate import generate
from k2cli.model.io import load_model

FACTS = "The code of Anna Avery Berg is 48213.\nThe code of Tom Lee is 77120.\n"
QUESTION = "What is the code of Anna Avery Berg? The code of Anna Avery Berg is"
ANSWER = " 48213."
NAMES = ["Helga", "Aaron", "Matteo", "Nikolai", "Anna", "Tom", "Gray", "Richter", "Wagner", "Falk"]


def mean_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine similarity over distinct pairs of rows."""
    v = F.normalize(vectors, dim=-1)
    n = len(v)
    return float(((v @ v.T).sum() - n) / (n * (n - 1)))


@torch.no_grad()
def probe(ref: str) -> None:
    model, art = load_model(ref)
    model.eval()
    tok = load_tokenizer(art.path)
    prompt = [tok.eot_id] + tok.encode(FACTS + QUESTION)
    ids = torch.tensor([prompt + tok.encode(ANSWER)])
    # loss of token t+1 given tokens 0..t: [T-1]
    losses = F.cross_entropy(model(ids)[0, :-1].float(), ids[0, 1:], reduction="none")
    # the last tokens: " Berg", " is", the number's tokens, "."
    n_tail = len(tok.encode(" Berg is" + ANSWER))
    tail = ids[0, -n_tail:].tolist()
    print(f"{art.id}")
    print("  answer tokens (teacher-forced loss, nats): "
          + "  ".join(f"{tok.decode([t])!r} {l:.1f}" for t, l in zip(tail, losses[-n_tail:].tolist())))
    out = generate(model, [prompt], max_new_tokens=6, temperature=0.0)[0]
    print(f"  greedy answer: {tok.decode(out)!r} (expected {ANSWER!r})")
    emb = model.embed_tokens.weight
    digits = [tok.encode(str(d))[0] for d in range(10)]
    names = [tok.encode(" " + n)[0] for n in NAMES]
    print(f"  input embeddings, mean cosine: digits {mean_cosine(emb[digits]):.2f}, names {mean_cosine(emb[names]):.2f}")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip())
        return 2
    for ref in argv:
        try:
            probe(ref)
        except K2Error as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
