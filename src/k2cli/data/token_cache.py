"""Tokenise a corpus once into a memory-mapped token file, cached by corpus and tokenizer.

    <root>/cache/tokens/<corpus key>-<tokenizer fingerprint>/
        tokens.bin    every document's ids back to back: uint16 when the vocabulary fits, else uint32
        offsets.npy   int64 [n_docs + 1]: document d is tokens[offsets[d] : offsets[d + 1]]
        meta.json     dtype, document and token counts

This is what makes a corpus's memory cost independent of its size (nanochat and torchtitan stream
pre-tokenised shards the same way): training reads rows straight from the file (data/packing.py's
PackedStream), so a 100M-token corpus costs 200 MB of disk and only the pages a step touches in RAM,
instead of ~50 bytes per token of Python lists.

Built in chunks (documents -> tokenizers' batch encode, parallel in Rust -> appended to the file), so
building is bounded in memory too; written in a temporary directory renamed into place, under a file
lock, so torchrun ranks (or two runs) that share the cache build it once and never read half a file.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from k2cli.errors import K2Error

CHUNK_DOCS = 1024  # documents per batch encode


@dataclass
class TokenFile:
    tokens: np.ndarray  # [total tokens], memory-mapped, uint16/uint32
    offsets: np.ndarray  # [n_docs + 1] int64
    mask: np.ndarray | None = None  # [total tokens] bool: the token counts in the loss (chat data, in memory)

    @classmethod
    def in_memory(cls, docs: list[list[int]], masks: list[list[bool]] | None = None) -> "TokenFile":
        """Documents already tokenised (e.g. rendered chats and their loss masks), in the same layout."""
        offsets = np.concatenate(([0], np.cumsum([len(d) for d in docs]))).astype(np.int64)
        tokens = np.concatenate([np.asarray(d, np.int32) for d in docs]) if docs else np.zeros(0, np.int32)
        mask = None if masks is None else (np.concatenate([np.asarray(m, bool) for m in masks]) if masks else np.zeros(0, bool))
        return cls(tokens, offsets, mask)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def docs(self, indices) -> list[list[int]]:
        """Documents as lists of ids (for code that edits documents, e.g. long-context rows)."""
        return [self.doc(int(i)).tolist() for i in indices]


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def open_token_file(directory: Path) -> TokenFile:
    meta = json.loads((directory / "meta.json").read_text())
    offsets = np.load(directory / "offsets.npy")
    if int(offsets[-1]) == 0:  # np.memmap cannot map an empty file
        return TokenFile(np.zeros(0, dtype=meta["dtype"]), offsets)
    return TokenFile(np.memmap(directory / "tokens.bin", dtype=meta["dtype"], mode="r"), offsets)


def texts_in_chunks(ds, size: int = CHUNK_DOCS):
    """Lists of `size` document texts from a Dataset (Arrow-backed: read a chunk at a time)."""
    for batch in ds.iter(batch_size=size):
        yield batch["text"]


def tokenize_to_cache(ds, tokenizer, cache_dir: Path, key: str) -> TokenFile:
    """The corpus `ds` (a `text` column) tokenised into `cache_dir`, built once per (key, tokenizer)."""
    directory = Path(cache_dir) / f"{key}-{tokenizer.fingerprint()}"
    if (directory / "meta.json").is_file():
        return open_token_file(directory)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(cache_dir) / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same file: wait for it
        if not (directory / "meta.json").is_file():
            _build(ds, tokenizer, directory)
    return open_token_file(directory)


def _build(ds, tokenizer, directory: Path) -> None:
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        offsets = [0]
        with open(tmp / "tokens.bin", "wb") as f:
            for texts in texts_in_chunks(ds):
                ids = tokenizer.encode_batch(texts)
                lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
                if lengths.sum():
                    np.concatenate([np.asarray(x, dtype=dtype) for x in ids if x]).tofile(f)
                offsets.extend((offsets[-1] + np.cumsum(lengths)).tolist())
            f.flush()
            os.fsync(f.fileno())
        np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        meta = {"dtype": np.dtype(dtype).name, "documents": len(offsets) - 1, "tokens": offsets[-1]}
        (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
        os.replace(tmp, directory)
    except OSError as e:
        raise K2Error(f"cannot write the token cache in {directory.parent}: {e.strerror}",
                      "free disk space or make the artifacts root writable") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
