"""From a corpus reference to packed training and validation rows (pretrain, extend-context), and the
pre-training corpus of a model, found through its lineage (k2cli.lineage), as training documents
(sft replay). Which documents are held out is a `lineage.Split`: pretrain defines it, later stages
read the one their model's pre-training recorded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from k2cli.artifacts import artifacts_root
from k2cli.data.loading import corpus_fingerprint, load_corpus
from k2cli.data.packing import PackedData, pack, tokenize_corpus, unigram_entropy
from k2cli.lineage import Split, corpus_split


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


def training_texts(ds, split: Split) -> list[str]:
    """The training documents' text (validation held out), e.g. to train a tokenizer on."""
    train_idx, _ = split.indices(len(ds))
    return ds.select(train_idx)["text"]


def split_token_documents(ds, fingerprint: str, tokenizer, split: Split) -> tuple[list, list, int]:
    """Tokenise (cached under <root>/cache) and hold out validation documents:
    (training documents' ids, validation documents' ids, number of documents)."""
    ids = tokenize_corpus(ds, tokenizer, artifacts_root() / "cache" / "tokens", fingerprint)["ids"]
    train_idx, val_idx = split.indices(len(ids))
    return [ids[i] for i in train_idx], [ids[i] for i in val_idx], len(ids)


def build_lm_data(ds, art, fingerprint: str, tokenizer, seq_len: int, split: Split, seed: int) -> LMData:
    """Tokenise, hold out validation documents (`split`), shuffle and pack by `seed`."""
    train_docs, val_docs, n_docs = split_token_documents(ds, fingerprint, tokenizer, split)
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


def training_documents(model_art, tokenizer, ref: str = "", text_field: str = "text", key: str = "data.corpus",
                       required: bool = True):
    """The pre-training corpus's TRAINING documents as token ids (held-out ones left out), its
    dataset artifact (or None) and how it was found: what a later stage replays. Without `ref`
    and with nothing in the lineage: ([], None, "") when not `required` (a corpus that is found
    but fails to load is always an error)."""
    split = corpus_split(model_art, ref, key=key, required=required)
    if split is None:
        return [], None, ""
    ds, art, fingerprint = load_documents(DataConfig(input=split.corpus, text_field=text_field))
    return split_token_documents(ds, fingerprint, tokenizer, split)[0], art, split.how
