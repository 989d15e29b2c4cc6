"""Streaming corpora: a token file on disk, rows read on demand, identical to in-memory packing."""

import threading

import numpy as np
import pytest

from k2cli.data.packing import PackedStream, entropy_of_counts, pack, unigram_entropy
from k2cli.data.token_cache import TokenFile, open_token_file, tokenize_to_cache
from k2cli.errors import K2Error


def _token_file(docs):
    flat = np.concatenate([np.asarray(d, np.uint16) for d in docs]) if docs else np.zeros(0, np.uint16)
    return TokenFile(flat, np.concatenate(([0], np.cumsum([len(d) for d in docs]))).astype(np.int64))


@pytest.mark.parametrize("seq_len", [3, 16, 64])
def test_stream_rows_equal_in_memory_packing(seq_len):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 50, size=rng.integers(0, 40)).tolist() for _ in range(200)]  # empty ones too
    ids = np.sort(rng.choice(200, 150, replace=False))
    packed, stream = pack([docs[i] for i in ids], 0, seq_len, seed=7), PackedStream(_token_file(docs), ids, 0, seq_len, seed=7)
    assert len(stream) == len(packed)
    assert (stream.token_rows(np.arange(len(packed))) == packed.tokens).all()
    some = np.array([5, 0, len(packed) - 1])
    assert all((stream.rows(some)[k] == packed.rows(some)[k]).all() for k in ("input_ids", "targets"))
    # the unigram entropy of the targets, counted from the file, is the in-memory figure exactly
    assert entropy_of_counts(stream.target_counts(50, chunk_docs=7)) == unigram_entropy(packed.tokens[:, 1:], 50)


def _targets_by_document(stream, indices):
    """(document, offset) of every target position the rows `indices` train on (EOTs left out)."""
    seen = set()
    for i in indices:
        epoch, r = divmod(int(i), len(stream))
        slot_doc, slot_len, slot_start = stream.layout(epoch)
        pos = r * stream.T + np.arange(1, stream.T + 1)  # target positions of the row
        slot = np.searchsorted(slot_start, pos, side="right") - 1
        within = pos - slot_start[slot]
        seen |= {(int(slot_doc[s]), int(w)) for s, w in zip(slot, within) if w < slot_len[s] - 1}
    return seen


def test_every_epoch_is_repacked_and_every_document_token_is_trained():
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 50, size=rng.integers(3, 30)).tolist() for _ in range(60)]
    stream = PackedStream(_token_file(docs), np.arange(60), 0, 16, seed=5)
    n = len(stream)
    epoch0, epoch1 = stream.token_rows(np.arange(n)), stream.token_rows(n + np.arange(n))
    assert epoch0.shape == epoch1.shape and (epoch0 != epoch1).any()  # new order, new cuts
    # epoch 0 is the single packing `pack` makes (runs of at most one epoch are unchanged)
    assert (epoch0 == pack(docs, 0, 16, seed=5).tokens).all()
    # rows are a pure function of (seed, epoch, row): a fresh stream (a resumed run) reads the same rows
    again = PackedStream(_token_file(docs), np.arange(60), 0, 16, seed=5)
    assert (again.token_rows([2 * n + 3, 5, n + 7]) == stream.token_rows([2 * n + 3, 5, n + 7])).all()
    # each epoch drops a tail of < T tokens, a different one each epoch: over the epochs that the
    # training order visits, every token of every document is a target at least once
    from k2cli.data.packing import batch_indices
    steps = 3 * n // 4  # three epochs, batches of 4
    trained = _targets_by_document(stream, np.concatenate([batch_indices(s, 4, n, seed=5) for s in range(steps)]))
    assert trained == {(d, o) for d in range(60) for o in range(len(docs[d]))}
    # one epoch alone misses its tail
    assert len(_targets_by_document(stream, np.arange(n))) < len(trained)


def test_chat_masks_are_repacked_with_their_tokens():
    from k2cli.data.token_cache import TokenFile
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    masks = [[False, True, True], [False, True], [False, False, True, True], [True]]
    stream = PackedStream(TokenFile.in_memory(docs, masks), np.arange(4), 0, 4, seed=0, train_separator=False)
    trained = {5: False, 6: True, 7: True, 8: False, 9: True, 10: False, 11: False, 12: True, 13: True, 14: True, 0: False}
    for epoch in range(3):
        rows = epoch * len(stream) + np.arange(len(stream))
        targets, tokens = stream.rows(rows)["targets"], stream.token_rows(rows)[:, 1:]
        for t, tok in zip(targets.flatten().tolist(), tokens.flatten().tolist()):
            assert (t != -100) == trained[tok] and (t == -100 or t == tok)


def test_stream_too_short_is_a_clear_error():
    with pytest.raises(K2Error, match="not enough for one sequence"):
        PackedStream(_token_file([[1, 2]]), [0], 0, 8, seed=0)


class _Tok:
    vocab_size = 300  # > 256: still uint16

    def fingerprint(self):
        return "tok"

    def encode_batch(self, texts):
        return [[ord(c) for c in t] for t in texts]


def test_token_cache_is_built_once_and_memory_mapped(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["hello", "", "k2 streams"] * 700})
    calls = []
    tok = _Tok()
    tok.encode_batch = lambda texts, f=tok.encode_batch: calls.append(len(texts)) or f(texts)
    tf = tokenize_to_cache(ds, tok, tmp_path, "corpus")
    assert isinstance(tf.tokens, np.memmap) and tf.tokens.dtype == np.uint16
    assert len(tf) == 2100 and tf.doc(2).tolist() == [ord(c) for c in "k2 streams"] and tf.doc(1).tolist() == []
    assert sum(calls) == 2100 and max(calls) <= 1024  # encoded in bounded chunks
    again = tokenize_to_cache(ds, tok, tmp_path, "corpus")
    assert sum(calls) == 2100 and (again.offsets == tf.offsets).all()  # the cache, not a second encode
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_concurrent_builders_share_one_build(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["abc"] * 50})
    calls, results = [], []
    tok = _Tok()
    tok.encode_batch = lambda texts, f=tok.encode_batch: calls.append(1) or f(texts)
    threads = [threading.Thread(target=lambda: results.append(tokenize_to_cache(ds, tok, tmp_path, "c"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3
    assert open_token_file(tmp_path / "c-tok").tokens.tolist() == [ord("a"), ord("b"), ord("c")] * 50
