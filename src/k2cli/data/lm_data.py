"""From a corpus reference to packed training and validation rows (pretrain, extend-context), and the
pre-training corpus of a model, found through its lineage (k2cli.lineage), as training documents
(sft replay). Which documents are held out is a `lineage.Split`: pretrain defines it, later stages
read the one their model's pre-training recorded.

The corpus is tokenised once into a memory-mapped token file (data/token_cache.py) and the rows are
read from it on demand (data/packing.py's PackedStream): memory does not grow with the corpus."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from k2cli.artifacts import artifacts_root
from k2cli.data.loading import corpus_fingerprint, load_corpus
from k2cli.data.packing import PackedData, PackedStream, entropy_of_counts
from k2cli.data.token_cache import TokenFile, tokenize_to_cache
from k2cli.lineage import Split, corpus_split


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


def training_texts(ds, split: Split) -> list[str]:
    """The training documents' text (validation held out), e.g. to train a tokenizer on."""
    train_idx, _ = split.indices(len(ds))
    return ds.select(train_idx)["text"]


def token_file(ds, fingerprint: str, tokenizer) -> TokenFile:
    """The corpus's token file, built once under <root>/cache/tokens."""
    return tokenize_to_cache(ds, tokenizer, artifacts_root() / "cache" / "tokens", fingerprint)


def split_token_documents(ds, fingerprint: str, tokenizer, split: Split) -> tuple[list, list, int]:
    """Tokenise (cached) and hold out validation documents (`split`), as lists of ids for code that
    edits documents (long-context rows, SFT replay): (training documents, validation documents, count)."""
    tf = token_file(ds, fingerprint, tokenizer)
    train_idx, val_idx = split.indices(len(tf))
    return tf.docs(train_idx), tf.docs(val_idx), len(tf)


def build_lm_data(ds, art, fingerprint: str, tokenizer, seq_len: int, split: Split, seed: int) -> LMData:
    """Tokenise (cached), hold out validation documents (`split`), shuffle and pack by `seed`: rows
    read from the token file."""
    tf = token_file(ds, fingerprint, tokenizer)
    train_idx, val_idx = split.indices(len(tf))
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
