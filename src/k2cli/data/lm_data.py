"""From a corpus reference to packed training and validation rows (pretrain, extend-context), and the
pre-training corpus of a model found through its lineage (extend-context, sft replay)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from k2cli.artifacts import artifacts_root, lineage
from k2cli.data.loading import corpus_fingerprint, load_corpus
from k2cli.data.packing import PackedData, pack, split_documents, tokenize_corpus, unigram_entropy
from k2cli.errors import K2Error


@dataclass
class DataConfig:
    input: str = "rephrase:latest"  # a dataset artifact, a save_to_disk directory, or .txt/.jsonl/.parquet files
    text_field: str = "text"
    val_fraction: float = 0.05  # documents held out for validation


@dataclass
class LMData:
    train: PackedData
    val: PackedData
    n_docs: int
    n_train_tokens: int
    unigram_entropy: float
    input_artifact: object  # the dataset Artifact, or None for plain files
    fingerprint: str


def load_documents(cfg: DataConfig):
    ds, art = load_corpus(cfg.input, cfg.text_field)
    return ds, art, corpus_fingerprint(cfg.input)


def training_texts(ds, val_fraction: float, seed: int) -> list[str]:
    """The training documents' text (validation held out), e.g. to train a tokenizer on."""
    train_idx, _ = split_documents(len(ds), val_fraction, seed)
    return ds.select(train_idx)["text"]


def split_token_documents(ds, fingerprint: str, tokenizer, val_fraction: float, seed: int) -> tuple[list, list, int]:
    """Tokenise (cached under <root>/cache) and hold out validation documents:
    (training documents' ids, validation documents' ids, number of documents)."""
    ids = tokenize_corpus(ds, tokenizer, artifacts_root() / "cache" / "tokens", fingerprint)["ids"]
    train_idx, val_idx = split_documents(len(ids), val_fraction, seed)
    return [ids[i] for i in train_idx], [ids[i] for i in val_idx], len(ids)


def build_lm_data(ds, art, fingerprint: str, tokenizer, seq_len: int, val_fraction: float, seed: int) -> LMData:
    """Tokenise, hold out validation documents, shuffle, pack."""
    train_docs, val_docs, n_docs = split_token_documents(ds, fingerprint, tokenizer, val_fraction, seed)
    train = pack(train_docs, tokenizer.eot_id, seq_len, seed)
    val = pack(val_docs, tokenizer.eot_id, seq_len, seed + 1) if val_docs else PackedData(np.zeros((0, seq_len + 1), np.int32))
    n_tokens = sum(len(d) + 1 for d in train_docs)
    return LMData(
        train=train,
        val=val,
        n_docs=n_docs,
        n_train_tokens=n_tokens,
        unigram_entropy=unigram_entropy(train.tokens[:, 1:], tokenizer.vocab_size),
        input_artifact=art,
        fingerprint=fingerprint,
    )


def cache_dir() -> Path:
    return artifacts_root() / "cache"


def lineage_corpus(model_art, ref: str = "", val_fraction: float = 0.05, seed: int = 0,
                   key: str = "data.input") -> tuple[str, int, float, str]:
    """(corpus ref, split seed, validation fraction, how it was found).

    With `ref`, that corpus split by (val_fraction, seed). Otherwise the corpus the model was
    pre-trained on, split exactly as the pretrain run split it, so its held-out documents stay held
    out. `key` is the recipe key that names a corpus explicitly (for the error's hint)."""
    if ref:
        return ref, seed, val_fraction, f"{key}={ref}"
    for _, node in lineage(model_art):
        if isinstance(node, dict) or node.kind != "model" or "input" not in node.recipe.get("data", {}):
            continue
        data = node.recipe["data"]
        found = data["input"]
        for inp in node.manifest.get("inputs", []):  # the dataset version it actually read, not today's :latest
            if inp.get("kind") == "dataset" and Path(inp.get("path", "")).is_dir():
                found = inp["path"]
                break
        return found, int(node.recipe.get("seed", 0)), float(data.get("val_fraction", 0.05)), f"the corpus of {node.id}"
    raise K2Error(f"no pre-training corpus found in the lineage of {model_art.id}",
                  f"pass the corpus with --set {key}=REF (a dataset artifact or text files)")


def training_documents(model_art, tokenizer, ref: str = "", text_field: str = "text", key: str = "data.corpus",
                       required: bool = True):
    """The pre-training corpus's TRAINING documents as token ids (held-out ones left out), its
    dataset artifact (or None) and how it was found: what a later stage replays. Without `ref`
    and with nothing in the lineage: ([], None, "") when not `required` (a corpus that is found
    but fails to load is always an error)."""
    try:
        ref, split_seed, val_fraction, how = lineage_corpus(model_art, ref, key=key)
    except K2Error:
        if required or ref:
            raise
        return [], None, ""
    ds, art, fingerprint = load_documents(DataConfig(input=ref, text_field=text_field))
    return split_token_documents(ds, fingerprint, tokenizer, val_fraction, split_seed)[0], art, how
