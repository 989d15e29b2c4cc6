"""Tokenise a corpus (cached), hold out validation documents, shuffle, and pack fixed-length rows.

Documents are shuffled across the whole corpus BEFORE packing, so that rewrites of one
document (or all biographies of one person) do not share a context window — with them
side by side, a model can copy instead of recall, and held-out knowledge collapses
(the Physics of Language Models 3.1 pitfall).

Packing: shuffled documents are concatenated, each followed by `<|endoftext|>`, and the
stream is cut into rows of seq_len + 1 tokens with stride seq_len (row i's last token is
row i+1's first), so every token is predicted exactly once. Inputs are row[:-1], targets
row[1:]. An optional loss mask (for chat data) travels with the tokens.

Training data is re-packed every epoch (PackedStream): a new document order, so new cuts,
deterministic per (seed, epoch). `pack` is one fixed packing (evaluation rows, tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from k2cli.errors import K2Error


@dataclass
class PackedData:
    """Rows packed once (evaluation rows, or a row mix built by hand like long-context data). As
    training data every epoch reads the same rows: an index epoch * N + r is row r."""

    tokens: np.ndarray  # [N, T+1] int32
    mask: np.ndarray | None = None  # [N, T+1] bool: target token counts in the loss

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1] - 1

    def token_rows(self, indices) -> np.ndarray:
        """Rows [n, T+1] of token ids."""
        return self.tokens[np.asarray(indices) % len(self)]

    def rows(self, indices) -> dict[str, torch.Tensor]:
        """A batch: input_ids [B, T], targets [B, T] (-100 where the mask says ignore)."""
        rows = torch.from_numpy(self.token_rows(indices).astype(np.int64))
        inputs, targets = rows[:, :-1], rows[:, 1:].clone()
        if self.mask is not None:
            keep = torch.from_numpy(self.mask[np.asarray(indices) % len(self)][:, 1:])
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
    order = document_order(len(documents), seed, 0)
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
    """Training rows packed from documents `doc_ids` of a token file, RE-PACKED EVERY EPOCH, read on demand.

    Each epoch shuffles the documents anew (a pure function of (seed, epoch)) and cuts the virtual
    stream "doc, EOT, doc, EOT, ..." into rows of T + 1 tokens with stride T. Packing once and
    repeating it would cut every document at the same place in every epoch (a biography split at a
    row boundary loses its subject's name in every epoch) and drop the same tail every epoch: a
    bias against multi-epoch training. Re-packed, the cuts move and the dropped tail (< T tokens)
    is different documents each epoch. Epoch 0 is exactly `pack(tf.docs(doc_ids), eot_id, seq_len, seed)`.

    A row index names a row of one epoch's packing: index = epoch * n_rows + row (what
    `batch_indices` returns). Every epoch has the same n_rows (the stream's length does not depend
    on the order). Only four int64 numbers per document live in memory per epoch layout:

        slot_doc   [n]      file index of the document in each shuffled slot
        slot_start [n + 1]  stream position where each slot begins (a cumulative sum of length + 1)

    and a stream position maps back to (document, offset) by a binary search over slot_start.
    With a per-token loss mask (`tf.mask`, chat data), `train_separator` says whether predicting
    the EOT between documents counts.
    """

    def __init__(self, tf, doc_ids, eot_id: int, seq_len: int, seed: int, train_separator: bool = True):
        self.tf, self.eot_id, self.T, self.seed = tf, eot_id, seq_len, seed
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.train_separator = train_separator
        self._layouts: dict[int, tuple] = {}
        slot_doc, slot_len, slot_start = self.layout(0)
        self.n_stream = int(slot_start[-1])
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

    @property
    def mask(self):
        return getattr(self.tf, "mask", None)

    def layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(slot_doc, slot_len, slot_start) of `epoch`'s packing; the last two epochs asked for are kept."""
        if epoch not in self._layouts:
            slot_doc = self.doc_ids[document_order(len(self.doc_ids), self.seed, epoch)]
            slot_len = self.tf.lengths()[slot_doc] + 1  # the document and its EOT
            self._layouts = {e: v for e, v in self._layouts.items() if e == epoch - 1}
            self._layouts[epoch] = (slot_doc, slot_len, np.concatenate(([0], np.cumsum(slot_len))))
        return self._layouts[epoch]

    def tokens_at(self, pos: np.ndarray, epoch: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """Token ids (int32) at stream positions `pos` (any shape) of `epoch`'s packing, and the loss
        mask there (None without one)."""
        slot_doc, slot_len, slot_start = self.layout(epoch)
        slot = np.searchsorted(slot_start, pos, side="right") - 1
        within = pos - slot_start[slot]
        is_eot = within == slot_len[slot] - 1
        src = np.where(is_eot, 0, self.tf.offsets[slot_doc[slot]] + within)
        tokens = np.where(is_eot, self.eot_id, self.tf.tokens[src]).astype(np.int32)
        mask = None if self.mask is None else np.where(is_eot, self.train_separator, self.mask[src])
        return tokens, mask

    def _rows(self, indices) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows [n, T+1] (and their mask): index epoch * n_rows + r is stream[r T : r T + T + 1] of that epoch."""
        indices = np.asarray(indices, dtype=np.int64)
        epochs, rows = np.divmod(indices, self.n_rows)
        tokens = np.empty((len(indices), self.T + 1), dtype=np.int32)
        mask = None if self.mask is None else np.empty(tokens.shape, dtype=bool)
        for epoch in np.unique(epochs):  # one or two epochs per batch
            sel = epochs == epoch
            pos = rows[sel][:, None] * self.T + np.arange(self.T + 1)
            tokens[sel], m = self.tokens_at(pos, int(epoch))
            if mask is not None:
                mask[sel] = m
        return tokens, mask

    def token_rows(self, indices) -> np.ndarray:
        return self._rows(indices)[0]

    def rows(self, indices) -> dict[str, torch.Tensor]:
        """A batch: input_ids [B, T], targets [B, T] (-100 where the mask says ignore)."""
        tokens, mask = self._rows(indices)
        rows = torch.from_numpy(tokens.astype(np.int64))
        inputs, targets = rows[:, :-1], rows[:, 1:].clone()
        if mask is not None:
            targets[~torch.from_numpy(mask[:, 1:])] = -100
        return {"input_ids": inputs, "targets": targets}

    def target_counts(self, vocab_size: int, chunk_docs: int = 4096) -> np.ndarray:
        """How often each id is a target in epoch 0 (positions 1 .. n_rows T of the stream), counted from
        the file a chunk of documents at a time: the unigram distribution of what the model is trained on."""
        slot_doc, _, _ = self.layout(0)
        counts = np.zeros(vocab_size, dtype=np.int64)
        for s in range(0, len(slot_doc), chunk_docs):
            docs = slot_doc[s : s + chunk_docs]
            pieces = [self.tf.doc(int(d)) for d in docs]
            if any(len(p) for p in pieces):
                counts += np.bincount(np.concatenate(pieces), minlength=vocab_size)
            counts[self.eot_id] += len(docs)
        # not targets: the stream's first token and the tail after the last full row
        excluded = np.concatenate(([0], np.arange(self.n_rows * self.T + 1, self.n_stream)))
        np.subtract.at(counts, self.tokens_at(excluded)[0], 1)
        return counts


def document_order(n_docs: int, seed: int, epoch: int) -> np.ndarray:
    """The order documents are packed in, in `epoch`. Epoch 0 is `pack`'s shuffle (so a run of at most
    one epoch is packed as before re-packing existed); later epochs draw from their own stream (the
    trailing 1 keeps it apart from `epoch_order`'s)."""
    rng = np.random.default_rng(seed if epoch == 0 else [seed, epoch, 1])
    return rng.permutation(n_docs)


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def batch_indices(step: int, batch_size: int, n_rows: int, seed: int) -> np.ndarray:
    """Row indices (epoch * n_rows + row) of the global batch of optimizer step `step` (0-based).

    The order is a pure function of (seed, step): a fresh permutation of the rows per epoch (and,
    in PackedStream, a fresh packing), batches taken in sequence across epoch boundaries. Resuming
    at step s therefore needs no sampler state, and data-parallel ranks take disjoint slices of the
    same global batch.
    """
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_rows)
        perm = epoch_order(n_rows, seed, epoch)
        take = min(batch_size - len(out), n_rows - offset)
        out.extend((epoch * n_rows + perm[offset : offset + take]).tolist())
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
