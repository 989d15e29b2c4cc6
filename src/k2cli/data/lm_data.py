"""From a corpus reference to packed training and validation rows (pretrain, extend-context)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from k2cli.artifacts import artifacts_root
from k2cli.data.loading import corpus_fingerprint, load_corpus
from k2cli.data.packing import PackedData, pack, split_documents, tokenize_corpus, unigram_entropy


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


def build_lm_data(ds, art, fingerprint: str, tokenizer, seq_len: int, val_fraction: float, seed: int) -> LMData:
    """Tokenise (cached under <root>/cache), hold out validation documents, shuffle, pack."""
    cache = artifacts_root() / "cache" / "tokens"
    tokenized = tokenize_corpus(ds, tokenizer, cache, fingerprint)
    ids = tokenized["ids"]
    train_idx, val_idx = split_documents(len(ids), val_fraction, seed)
    train_docs = [ids[i] for i in train_idx]
    val_docs = [ids[i] for i in val_idx]
    train = pack(train_docs, tokenizer.eot_id, seq_len, seed)
    val = pack(val_docs, tokenizer.eot_id, seq_len, seed + 1) if val_docs else PackedData(np.zeros((0, seq_len + 1), np.int32))
    n_tokens = sum(len(d) + 1 for d in train_docs)
    return LMData(
        train=train,
        val=val,
        n_docs=len(ids),
        n_train_tokens=n_tokens,
        unigram_entropy=unigram_entropy(train.tokens[:, 1:], tokenizer.vocab_size),
        input_artifact=art,
        fingerprint=fingerprint,
    )


def cache_dir() -> Path:
    return artifacts_root() / "cache"
