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

    def token_rows(self, indices) -> np.ndarray:
        """Rows [n, T+1] of token ids."""
        return self.tokens[np.asarray(indices)]

    def rows(self, indices) -> dict[str, torch.Tensor]:
        """A batch: input_ids [B, T], targets [B, T] (-100 where the mask says ignore)."""
        rows = torch.from_numpy(self.token_rows(indices).astype(np.int64))
        inputs, targets = rows[:, :-1], rows[:, 1:].clone()
        if self.mask is not None:
            keep = torch.from_numpy(self.mask[np.asarray(indices)][:, 1:])
            targets[~keep] = -100
        return {"input_ids": inputs, "targets": targets}


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


class PackedStream:
    """The rows `pack` would make of documents `doc_ids` of a token file, read from the file on demand.

    Same shuffle, same cuts, same rows as `pack(tf.docs(doc_ids), eot_id, seq_len, seed)`, but only
    four int64 numbers per document live in memory (no row array): row i covers positions
    [i T, i T + T + 1) of the virtual stream "doc, EOT, doc, EOT, ..." in shuffled order, and a
    position maps back to (document, offset) by a binary search over the documents' start positions.

        slot_doc   [n]      file index of the document in each shuffled slot
        slot_start [n + 1]  stream position where each slot begins (a cumulative sum of length + 1)
    """

    def __init__(self, tf, doc_ids, eot_id: int, seq_len: int, seed: int):
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.tf, self.eot_id, self.T = tf, eot_id, seq_len
        self.slot_doc = doc_ids[np.random.default_rng(seed).permutation(len(doc_ids))]
        self.slot_len = tf.lengths()[self.slot_doc] + 1  # the document and its EOT
        self.slot_start = np.concatenate(([0], np.cumsum(self.slot_len)))
        self.n_stream = int(self.slot_start[-1])
        self.n_rows = (self.n_stream - 1) // seq_len
        if self.n_rows < 1:
            raise K2Error(
                f"the corpus has {self.n_stream} tokens: not enough for one sequence of {seq_len + 1}",
                "add text or lower train.seq_len",
            )

    def __len__(self) -> int:
        return self.n_rows

    @property
    def seq_len(self) -> int:
        return self.T

    mask = None  # plain text: every target counts

    def tokens_at(self, pos: np.ndarray) -> np.ndarray:
        """Token ids at stream positions `pos` (any shape, int64)."""
        slot = np.searchsorted(self.slot_start, pos, side="right") - 1
        within = pos - self.slot_start[slot]
        is_eot = within == self.slot_len[slot] - 1
        src = np.where(is_eot, 0, self.tf.offsets[self.slot_doc[slot]] + within)
        return np.where(is_eot, self.eot_id, self.tf.tokens[src]).astype(np.int32)

    def token_rows(self, indices) -> np.ndarray:
        """Rows [n, T+1]: row i = stream[i T : i T + T + 1]."""
        pos = np.asarray(indices, dtype=np.int64)[:, None] * self.T + np.arange(self.T + 1)
        return self.tokens_at(pos)

    def rows(self, indices) -> dict[str, torch.Tensor]:
        rows = torch.from_numpy(self.token_rows(indices).astype(np.int64))
        return {"input_ids": rows[:, :-1], "targets": rows[:, 1:].clone()}

    def target_counts(self, vocab_size: int, chunk_docs: int = 4096) -> np.ndarray:
        """How often each id is a target (positions 1 .. n_rows T of the stream), counted from the file
        a chunk of documents at a time: the unigram distribution of what the model is trained on."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for s in range(0, len(self.slot_doc), chunk_docs):
            docs = self.slot_doc[s : s + chunk_docs]
            pieces = [self.tf.doc(int(d)) for d in docs]
            if any(len(p) for p in pieces):
                counts += np.bincount(np.concatenate(pieces), minlength=vocab_size)
            counts[self.eot_id] += len(docs)
        # not targets: the stream's first token and the tail after the last full row
        excluded = np.concatenate(([0], np.arange(self.n_rows * self.T + 1, self.n_stream)))
        np.subtract.at(counts, self.tokens_at(excluded), 1)
        return counts


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
    return entropy_of_counts(np.bincount(tokens.reshape(-1), minlength=vocab_size))


def entropy_of_counts(counts: np.ndarray) -> float:
    """Entropy (nats) of the distribution given by occurrence counts."""
    counts = counts.astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
