"""Tokenizer, corpus loading, packing and the data order that makes resume exact."""

import json

import numpy as np
import pytest

from conftest import assert_clean_error
from k2cli.data.loading import absolute_corpus_ref, corpus_fingerprint, load_corpus, parse_hub_ref
from k2cli.data.packing import batch_indices, pack, split_documents, unigram_entropy
from k2cli.data.tokenizer import EOT, SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from k2cli.errors import K2Error

TEXTS = [f"Person {i} was born in city {i % 7} and studied subject {i % 5} at university {i % 3}." for i in range(200)]


def test_tokenizer_reserves_specials_and_round_trips(tmp_path):
    tok = train_tokenizer(TEXTS, vocab_size=400)
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    text = "Person 12 was born in city 5. <|im_end|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.token_id("<|im_end|>") in ids
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(text) == ids and again.vocab_size == tok.vocab_size


def test_tokenizer_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = train_tokenizer(TEXTS, vocab_size=400)
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Person 3 studied subject 1. The pass key is 48213, born 1987."
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf.eos_token == EOT and hf.convert_tokens_to_ids("<|tool_call_begin|>") == tok.token_id("<|tool_call_begin|>")


def test_every_digit_is_its_own_token_unless_asked_otherwise():
    texts = [f"Badge {n} was issued in {1950 + n % 60}." for n in range(10000, 10400)] * 3
    split, merged = train_tokenizer(texts, vocab_size=500), train_tokenizer(texts, vocab_size=500, split_digits=False)
    pieces = lambda tok, s: [tok.decode([i]) for i in tok.encode(s)]  # noqa: E731
    assert pieces(split, " 10213 in 1987") == [" ", "1", "0", "2", "1", "3", " in", " ", "1", "9", "8", "7"]
    assert split.decode(split.encode(" 10213 in 1987")) == " 10213 in 1987"
    assert any(len(p.strip()) > 1 and p.strip().isdigit() for p in pieces(merged, " 10213 in 1987"))  # BPE merged some


def test_vocab_smaller_than_specials():
    with pytest.raises(K2Error, match="smaller than"):
        train_tokenizer(TEXTS, vocab_size=100)


def test_load_corpus_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[:5]) + "\n")
    ds, _ = load_corpus(str(tmp_path / "a.jsonl"))
    assert ds["text"] == TEXTS[:5] and len(set(ds["doc_id"])) == 5
    d = tmp_path / "txt"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.txt").write_text(TEXTS[i] + "\nsecond line")
    ds, _ = load_corpus(str(d))
    assert len(ds) == 3 and "second line" in ds[0]["text"]  # one document per file
    import datasets

    datasets.Dataset.from_dict({"body": TEXTS[:4]}).to_parquet(str(tmp_path / "p.parquet"))
    ds, _ = load_corpus(str(tmp_path / "p.parquet"), text_field="body")
    assert ds["text"] == TEXTS[:4]


@pytest.mark.parametrize(
    "content, words",
    [
        (b'{"text": "ok"}\n{"text": 5}\n', "line 2 has no string 'text'"),
        (b'{"text": "ok"}\nnot json\n', "line 2 is not valid JSON"),
        (b'{"text": "ok"}\n\xff\xfe\n', "line 2 is not UTF-8"),
        (b'{"text": "  "}\n', "empty"),
    ],
)
def test_bad_corpus(tmp_path, content, words):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(K2Error, match=words):
        load_corpus(str(p))


def test_load_saved_dataset_and_dataset_dict_splits(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": TEXTS[:3]}).save_to_disk(str(tmp_path / "ds"))
    assert load_corpus(str(tmp_path / "ds"))[0]["text"] == TEXTS[:3]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS[:4]}),
                               "validation": datasets.Dataset.from_dict({"text": TEXTS[4:6]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_corpus(str(tmp_path / "dd"))[0]["text"] == TEXTS[:4]  # train by default
    assert load_corpus(f"{tmp_path / 'dd'}@validation")[0]["text"] == TEXTS[4:6]
    assert corpus_fingerprint(str(tmp_path / "dd")) != corpus_fingerprint(f"{tmp_path / 'dd'}@validation")
    with pytest.raises(K2Error, match=r"splits \['train', 'validation'\], not 'test'"):
        load_corpus(f"{tmp_path / 'dd'}@test")
    with pytest.raises(K2Error, match="single Dataset, it has no split"):
        load_corpus(f"{tmp_path / 'ds'}@train")


def test_hub_dataset_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(K2Error, match="cannot load Hub dataset roneneldan/TinyStories split train"):
        load_corpus("hf:roneneldan/TinyStories")
    assert parse_hub_ref("hf:HuggingFaceFW/fineweb-edu:sample-10BT@train[:1%]") == (
        "HuggingFaceFW/fineweb-edu", "sample-10BT", "train[:1%]")
    with pytest.raises(K2Error, match="no dataset name"):
        parse_hub_ref("hf:")


def test_corpus_paths_are_recorded_absolute(tmp_path, monkeypatch):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    monkeypatch.chdir(tmp_path)
    assert absolute_corpus_ref("c.jsonl") == str(tmp_path / "c.jsonl")
    assert absolute_corpus_ref("rephrase:latest") == "rephrase:latest"  # artifact refs and Hub names as given
    assert absolute_corpus_ref("hf:a/b") == "hf:a/b"


def test_missing_corpus(tmp_path):
    with pytest.raises(K2Error, match="not found"):
        load_corpus(str(tmp_path / "nope.jsonl"))


def test_pack_shuffles_documents_and_separates_them():
    docs = [[i] * 5 for i in range(20, 40)]  # 20 documents, each one repeated token
    packed = pack(docs, eot_id=0, seq_len=8, seed=1)
    stream = np.concatenate([packed.tokens[0]] + [row[1:] for row in packed.tokens[1:]])
    # each document appears whole, followed by the separator, in a shuffled order
    firsts = [int(stream[i]) for i in range(0, len(stream), 6)]
    assert len(set(firsts)) == len(firsts) and set(firsts) <= set(range(20, 40)) and firsts != sorted(firsts)
    assert all(stream[i + 5] == 0 for i in range(0, len(stream) - 6, 6))
    # consecutive rows overlap by one token: every token is a target exactly once
    assert all(packed.tokens[i][-1] == packed.tokens[i + 1][0] for i in range(len(packed) - 1))


def test_pack_with_mask_and_targets():
    packed = pack([[5, 6, 7], [8, 9]], eot_id=0, seq_len=4, seed=0, masks=[[False, True, True], [False, True]])
    batch = packed.rows([0])
    assert batch["input_ids"].shape == (1, 4)
    assert ((batch["targets"] == -100) == ~__import__("torch").from_numpy(packed.mask[[0]][:, 1:])).all()


def test_batch_order_is_a_function_of_step():
    n = 10
    seen = np.concatenate([batch_indices(s, 4, n, seed=3) for s in range(5)])  # 2 epochs
    # an index names a row of one epoch's packing: epoch * n + row
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:20].tolist()) == list(range(10, 20))
    assert not np.array_equal(seen[:10], seen[10:20] - n)  # a new permutation each epoch
    assert np.array_equal(batch_indices(3, 4, n, seed=3), seen[12:16])


def test_split_and_entropy():
    tr, va = split_documents(100, 0.1, seed=0)
    assert len(va) == 10 and not set(tr) & set(va)
    assert unigram_entropy(np.array([1, 1, 2, 2]), 4) == pytest.approx(np.log(2))
    with pytest.raises(K2Error, match="too few"):
        split_documents(1, 0.5, seed=0)


def test_tokenizer_command(k2, tmp_path, artifacts_root):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    k2("tokenizer", "train", tmp_path / "c.jsonl", "--vocab-size", 400)
    assert load_tokenizer(artifacts_root / "tokenizer" / "v1").vocab_size <= 400
    assert_clean_error(k2("tokenizer", "train", tmp_path / "c.jsonl", "--vocab-size", 50, ok=False), "smaller than")
    assert_clean_error(k2("tokenizer", "train", tmp_path / "none.jsonl", ok=False), "not found")


@pytest.mark.parametrize("kind", ["txt_folder", "jsonl", "parquet", "saved_dataset", "dataset_dict"])
def test_every_corpus_source_pretrains_the_micro_model(k2, tmp_path, artifacts_root, kind):
    """`k2 pretrain CORPUS` for each kind of local corpus: it tokenises, packs and trains, and the
    manifest records the corpus by an absolute path (later stages find it from any directory)."""
    import datasets

    texts = [t + " " + TEXTS[(i * 7) % len(TEXTS)] for i, t in enumerate(TEXTS)]
    if kind == "txt_folder":
        (tmp_path / "c").mkdir()
        for i, t in enumerate(texts):
            (tmp_path / "c" / f"{i}.txt").write_text(t)
        ref = tmp_path / "c"
    elif kind == "jsonl":
        ref = tmp_path / "c.jsonl"
        ref.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    elif kind == "parquet":
        ref = tmp_path / "c.parquet"
        datasets.Dataset.from_dict({"text": texts}).to_parquet(str(ref))
    elif kind == "saved_dataset":
        ref = tmp_path / "c"
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(ref))
    else:
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts}),
                              "test": datasets.Dataset.from_dict({"text": texts[:5]})}).save_to_disk(str(tmp_path / "dd"))
        ref = f"{tmp_path / 'dd'}@train"
    k2("pretrain", ref, "--preset", "micro", "--set", "train.steps=2", "--set", "train.seq_len=64",
       "--set", "tokenizer.vocab_size=400")
    manifest = json.loads((artifacts_root / "pretrain" / "latest" / "manifest.json").read_text())
    assert manifest["metrics"]["final_loss"] > 0
    assert manifest["recipe"]["data"]["input"] == str(ref) and str(ref).startswith("/")
