"""Tokenise a corpus (cached), hold out validation documents, shuffle, and pack fixed-length rows.

Documents are shuffled across the whole corpus BEFORE packing, so that rewrites of one
document (or all biographies of one person) do not share a context window — with them
side by side, a model can copy instead of recall, and held-out knowledge collapses
(the Physics of Language Models 3.1 pitfall).

Packing: shuffled documents are concatenated, each followed by `<|endoftext|>`, and the
stream is cut into rows of seq_len + 1 tokens with stride seq_len (row i's last token is
row i+1's first), so every token is predicted exactly once. Inputs are row[:-1], targets
row[1:]. An optional loss mask (for chat data) travels with the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from k2cli.errors import K2Error


@dataclass
class PackedData:
    tokens: np.ndarray  # [N, T+1] int32
    mask: np.ndarray | None = None  # [N, T+1] bool: target token counts in the loss

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1] - 1

    def rows(self, indices) -> dict[str, torch.Tensor]:
        """A batch: input_ids [B, T], targets [B, T] (-100 where the mask says ignore)."""
        rows = torch.from_numpy(self.tokens[np.asarray(indices)].astype(np.int64))
        inputs, targets = rows[:, :-1], rows[:, 1:].clone()
        if self.mask is not None:
            keep = torch.from_numpy(self.mask[np.asarray(indices)][:, 1:])
            targets[~keep] = -100
        return {"input_ids": inputs, "targets": targets}


def tokenize_corpus(ds, tokenizer, cache_dir: Path | None, key: str):
    """Add an `ids` column with datasets.map; cached on disk under a tokenizer+data key."""
    cache_file = None
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache_file = str(Path(cache_dir) / f"tokens-{key}-{tokenizer.fingerprint()}.arrow")

    def encode(batch):
        return {"ids": tokenizer.encode_batch(batch["text"])}

    return ds.map(encode, batched=True, batch_size=256, cache_file_name=cache_file, load_from_cache_file=True,
                  desc=None)


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Document indices for training and validation (validation held out at document level)."""
    order = np.random.default_rng(seed).permutation(n_docs)
    n_val = int(round(n_docs * val_fraction)) if val_fraction > 0 else 0
    if val_fraction > 0:
        n_val = max(1, n_val)
    if n_val >= n_docs:
        raise K2Error(f"the corpus has {n_docs} documents: too few to hold out a validation split", "add text or lower data.val_fraction")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def pack(documents: list[list[int]], eot_id: int, seq_len: int, seed: int, masks: list[list[bool]] | None = None,
         train_separator: bool = True) -> PackedData:
    """Shuffle documents, join them with EOT, cut into [N, seq_len + 1] rows.

    With masks (chat data), `train_separator` says whether predicting the EOT between
    documents counts in the loss (chat turns already end with <|im_end|>: it does not)."""
    order = np.random.default_rng(seed).permutation(len(documents))
    pieces, mask_pieces = [], []
    for i in order:
        doc = documents[i]
        pieces.append(np.asarray(doc, dtype=np.int32))
        pieces.append(np.asarray([eot_id], dtype=np.int32))
        if masks is not None:
            mask_pieces.append(np.asarray(masks[i], dtype=bool))
            mask_pieces.append(np.asarray([train_separator]))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    n_rows = (len(stream) - 1) // seq_len
    if n_rows < 1:
        raise K2Error(
            f"the corpus has {len(stream)} tokens: not enough for one sequence of {seq_len + 1}",
            "add text or lower train.seq_len",
        )
    # row i = stream[i*T : i*T + T + 1]
    idx = np.arange(n_rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    tokens = stream[idx]
    mask = np.concatenate(mask_pieces)[idx] if masks is not None else None
    return PackedData(tokens, mask)


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def batch_indices(step: int, batch_size: int, n_rows: int, seed: int) -> np.ndarray:
    """Row indices of the global batch of optimizer step `step` (0-based).

    The order is a pure function of (seed, step): a fresh permutation per epoch, batches
    taken in sequence across epoch boundaries. Resuming at step s therefore needs no
    sampler state, and data-parallel ranks take disjoint slices of the same global batch.
    """
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_rows)
        perm = epoch_order(n_rows, seed, epoch)
        take = min(batch_size - len(out), n_rows - offset)
        out.extend(perm[offset : offset + take].tolist())
    return np.asarray(out)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the empirical unigram distribution: the loss of a model that
    ignores context. A trained model's validation loss should be far below it."""
    counts = np.bincount(tokens.reshape(-1), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
