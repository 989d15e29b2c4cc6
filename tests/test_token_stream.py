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
