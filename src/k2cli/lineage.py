"""Where a model's data came from: one walk over its lineage, always with an explicit override.

Every later stage and eval suite asks the same questions of a model artifact, answered here (a k2
model carries its own tokenizer, so that one needs no walk):

    nearest(art, test)                    the nearest artifact in the lineage (the model first) passing `test`
    dataset(art, *files, ref=, key=)      `ref` (--data, --set X=REF), else the nearest dataset holding `files`
    corpus_split(art, ref=, ...)          the pre-training corpus and the documents held out of it

The held-out split. `k2 pretrain` records in its manifest (`data_split`) which documents of which
corpus it held out: the rule (data/packing.py `split_documents(n, val_fraction, seed)`), its
parameters, and a sha256 of the held-out document indices. Later stages (extend-context, SFT
replay) and evals (perplexity, max logits, loss by position) read that record from the nearest
pre-training run in the lineage instead of re-deriving it from recipe keys, and `Split.indices`
checks the hash, so a corpus that changed under a model is an error rather than a silent leak.
Artifacts written before the record existed fall back to the pretrain run's recipe (the same rule).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from k2cli.artifacts import Artifact, lineage, open_artifact, resolve
from k2cli.errors import K2Error

SPLIT_RULE = "k2cli.data.packing.split_documents(documents, val_fraction, seed)"


def nodes(art: Artifact):
    """The artifacts of the lineage that are still on disk, nearest first."""
    for _, node in lineage(art):
        if not isinstance(node, dict):
            yield node


def nearest(art: Artifact, test) -> Artifact | None:
    return next((n for n in nodes(art) if test(n)), None)


def dataset(art: Artifact, *files: str, any_of: tuple[str, ...] = (), ref: str = "", key: str = "--data") -> Artifact | None:
    """The dataset named by `ref` (which must hold `files`), else the nearest dataset in the lineage holding
    all of `files` and, if given, one of `any_of`."""
    if ref:
        found = open_artifact(ref, kind="dataset")
        missing = [f for f in files if not found.has(f)]
        if missing:
            raise K2Error(f"dataset {found.id} has no {missing[0]}", f"pass the right dataset artifact ({key})")
        return found
    return nearest(art, lambda n: n.kind == "dataset" and all(n.has(f) for f in files)
                   and (not any_of or any(n.has(f) for f in any_of)))


# ----------------------------------------------------------------------------- the held-out split


def _sha(indices) -> str:
    return hashlib.sha256(",".join(str(int(i)) for i in sorted(indices)).encode()).hexdigest()


def split_record(corpus: str, n_documents: int, val_fraction: float, seed: int) -> dict:
    """What `k2 pretrain` stores as `data_split` in its manifest (`corpus`: the dataset path or file ref)."""
    from k2cli.data.packing import split_documents

    _, val = split_documents(n_documents, val_fraction, seed)
    return {"corpus": corpus, "rule": SPLIT_RULE, "documents": n_documents, "val_fraction": val_fraction, "seed": seed,
            "val_documents": len(val), "val_sha256": _sha(val)}


@dataclass
class Split:
    corpus: str  # a dataset path or a file reference, as load_corpus takes it
    val_fraction: float
    seed: int
    how: str  # for messages: where it was found
    source: Artifact | None = None  # the pre-training run that recorded (or implies) it
    val_sha256: str = ""  # empty for an explicit corpus or an artifact made before the record existed

    def indices(self, n_documents: int) -> tuple[list[int], list[int]]:
        """(training, held-out) document indices of a corpus of `n_documents`, checked against the record."""
        from k2cli.data.packing import split_documents

        train, val = split_documents(n_documents, self.val_fraction, self.seed)
        if self.val_sha256 and _sha(val) != self.val_sha256:
            raise K2Error(f"the corpus {self.corpus} no longer splits as {self.how} did ({n_documents} documents now)",
                          "re-run the stages from pre-training, or name another corpus explicitly")
        return train, val

    def same_corpus(self, path) -> bool:
        return Path(self.corpus).resolve() == Path(path).resolve()


def _recorded(node: Artifact) -> Split | None:
    rec = node.manifest.get("data_split")
    if rec:
        return Split(rec["corpus"], float(rec["val_fraction"]), int(rec["seed"]), f"the corpus of {node.id}", node,
                     rec.get("val_sha256", ""))
    if node.kind == "model" and node.stage == "pretrain" and "input" in node.recipe.get("data", {}):  # before the record
        data = node.recipe["data"]
        corpus = next((i["path"] for i in node.manifest.get("inputs", [])  # the dataset version it read, not :latest
                       if i.get("kind") == "dataset" and Path(i.get("path", "")).is_dir()), data["input"])
        return Split(corpus, float(data.get("val_fraction", 0.05)), int(node.recipe.get("seed", 0)),
                     f"the corpus of {node.id}", node)
    return None


def corpus_split(art: Artifact, ref: str = "", val_fraction: float = 0.05, seed: int = 0, key: str = "data.input",
                 required: bool = True) -> Split | None:
    """The corpus a model was pre-trained on and the documents held out of it (its nearest pre-training
    run's record), or, with `ref`, that corpus: split as the pre-training run split it when it is the same
    corpus, else by (val_fraction, seed). Without either: an error naming `key`, or None if not `required`."""
    found = next((s for s in map(_recorded, nodes(art)) if s is not None), None)
    if ref:
        if found is not None and found.same_corpus(resolve(ref)):
            return found
        return Split(ref, val_fraction, seed, f"{key}={ref}")
    if found is None and required:
        raise K2Error(f"no pre-training corpus found in the lineage of {art.id}",
                      f"pass the corpus with --set {key}=REF (a dataset artifact or text files)")
    return found


def heldout_split(art: Artifact, corpus) -> Split | None:
    """The split the model's pre-training held out of `corpus` (a dataset Artifact, or a corpus path), or
    None if it did not read it."""
    found = corpus_split(art, required=False)
    path = corpus.path if isinstance(corpus, Artifact) else corpus
    return found if found is not None and Path(str(path)).exists() and found.same_corpus(path) else None
