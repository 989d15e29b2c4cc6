"""From a corpus reference to packed training and validation rows (pretrain, extend-context), and the
pre-training corpus of a model found through its lineage (extend-context, sft replay).

The corpus is tokenised once into a memory-mapped token file (data/token_cache.py) and the rows are
read from it on demand (data/packing.py's PackedStream): memory does not grow with the corpus."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from k2cli.artifacts import artifacts_root, lineage
from k2cli.data.loading import corpus_fingerprint, load_corpus
from k2cli.data.packing import PackedData, PackedStream, entropy_of_counts, split_documents
from k2cli.data.token_cache import TokenFile, tokenize_to_cache
from k2cli.errors import K2Error


@dataclass
class DataConfig:
    input: str = "rephrase:latest"  # a dataset artifact, a save_to_disk directory, or .txt/.jsonl/.parquet files
    text_field: str = "text"
    val_fraction: float = 0.05  # documents held out for validation


@dataclass
class LMData:
    train: PackedStream
    val: PackedStream | PackedData  # an empty PackedData when nothing is held out
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


def token_file(ds, fingerprint: str, tokenizer) -> TokenFile:
    """The corpus's token file, built once under <root>/cache/tokens."""
    return tokenize_to_cache(ds, tokenizer, artifacts_root() / "cache" / "tokens", fingerprint)


def split_token_documents(ds, fingerprint: str, tokenizer, val_fraction: float, seed: int) -> tuple[list, list, int]:
    """Tokenise (cached) and hold out validation documents, as lists of ids for code that edits
    documents (long-context rows, SFT replay): (training documents, validation documents, count)."""
    tf = token_file(ds, fingerprint, tokenizer)
    train_idx, val_idx = split_documents(len(tf), val_fraction, seed)
    return tf.docs(train_idx), tf.docs(val_idx), len(tf)


def build_lm_data(ds, art, fingerprint: str, tokenizer, seq_len: int, val_fraction: float, seed: int) -> LMData:
    """Tokenise (cached), hold out validation documents, shuffle, pack: rows read from the token file."""
    tf = token_file(ds, fingerprint, tokenizer)
    train_idx, val_idx = split_documents(len(tf), val_fraction, seed)
    train = PackedStream(tf, train_idx, tokenizer.eot_id, seq_len, seed)
    val = PackedStream(tf, val_idx, tokenizer.eot_id, seq_len, seed + 1) if len(val_idx) else \
        PackedData(np.zeros((0, seq_len + 1), np.int32))
    return LMData(
        train=train,
        val=val,
        n_docs=len(tf),
        n_train_tokens=train.n_stream,
        unigram_entropy=entropy_of_counts(train.target_counts(tokenizer.vocab_size)),
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
