"""k2 sft: the data mix, masks, overlong handling, bad conversations, and a real (micro) run."""

import json

import numpy as np
import pytest

from conftest import assert_clean_error
from helpers import PEOPLE, chat_artifact, chat_texts, dataset_artifact, model_artifact
from k2cli.data.sft_data import SFTDataConfig, build_sft_data, load_conversations
from k2cli.data.tokenizer import load_tokenizer
from k2cli.errors import K2Error

TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"name": {"type": "string"}}}}}
CHATS = [{"messages": [{"role": "user", "content": f"Where does {n} live?"},
                       {"role": "assistant", "content": "", "tool_calls": [{"id": "functions.lookup:0", "type": "function",
                        "function": {"name": "lookup", "arguments": {"name": n}}}]},
                       {"role": "tool", "tool_call_id": "functions.lookup:0", "content": json.dumps({"city": c})},
                       {"role": "assistant", "content": f"{n} lives in {c}."}], "tools": [TOOL]} for n, c, _ in PEOPLE]


@pytest.fixture
def setup():
    data = dataset_artifact()
    chats = chat_artifact(CHATS)
    texts = [f"{n} was born in {c}. Where does {n} live?" for n, c, _ in PEOPLE] * 5 + chat_texts(CHATS) * 3
    model = model_artifact(texts, inputs=[data])
    return data, chats, model


def test_mix_masks_and_counts(setup):
    data, chats, model = setup
    tok = load_tokenizer(model.path)
    convs = {"agentic": load_conversations("agentic", chats), "qa": load_conversations("qa", data),
             "math": load_conversations("math", data)}
    sft = build_sft_data(tok, convs, SFTDataConfig(mix={"agentic": 2.0, "qa": 1.0, "math": 0.5}), seq_len=192, seed=0)
    assert sft.counts["agentic"]["used"] == 12 and sft.counts["qa"]["used"] == 4 and sft.counts["math"]["used"] == 2  # 4 train problems x 0.5
    rows = sft.train.rows(np.arange(len(sft.train)))
    trained = tok.decode([int(t) for t in rows["targets"].flatten() if t != -100])
    assert "lives in" in trained and "<|tool_call_begin|>" in trained
    assert "Where does" not in trained and "<|im_user|>" not in trained and "<|endoftext|>" not in trained


def test_overlong_dropped_or_truncated(setup):
    data, chats, model = setup
    tok = load_tokenizer(model.path)
    convs = {"agentic": load_conversations("agentic", chats), "qa": load_conversations("qa", data)}
    dropped = build_sft_data(tok, convs, SFTDataConfig(mix={"agentic": 1.0, "qa": 1.0}), seq_len=64, seed=0)  # agentic rows (174+ tokens) overlong, QA rows (55-57) fit
    assert dropped.counts["agentic"]["dropped_overlong"] == 6 and dropped.counts["agentic"]["used"] == 0
    kept = build_sft_data(tok, convs, SFTDataConfig(mix={"agentic": 1.0, "qa": 1.0}, overlong="truncate"), seq_len=64, seed=0)
    assert kept.counts["agentic"]["truncated"] == 6


def test_roles_out_of_order_are_rejected(setup):
    data, _, model = setup
    bad = chat_artifact([{"messages": [{"role": "tool", "tool_call_id": "functions.x:0", "content": "1"},
                                       {"role": "assistant", "content": "hi"}]}], stage="badchat")
    with pytest.raises(K2Error, match="no earlier assistant"):
        build_sft_data(load_tokenizer(model.path), {"agentic": load_conversations("agentic", bad)}, SFTDataConfig(), 64, 0)


def test_sft_command_end_to_end(setup, k2):
    data, chats, model = setup
    k2("sft", model.path, "--data", chats.path, "--set", "train.steps=3", "--set", "train.batch_size=2",
       "--set", "train.seq_len=192", "--set", "train.eval_every=3", "--set", "train.peak_tflops=1.0")
    from k2cli.artifacts import open_artifact

    art = open_artifact("sft:latest", kind="model")
    assert art.metrics["chat"] is True and art.metrics["agentic_used"] == 6
    assert art.has("metrics.jsonl") and art.has("tokenizer_config.json") and art.has("loss.png")
    lineage_ids = [i["id"] for i in art.manifest["inputs"]]
    assert model.id in lineage_ids and chats.id in lineage_ids and data.id in lineage_ids


def test_sft_bad_inputs(setup, k2):
    data, chats, model = setup
    short = ("--set", "train.seq_len=192")
    assert_clean_error(k2("sft", model.path, "--data", "agentic:v99", *short, ok=False), "not found")
    assert_clean_error(k2("sft", data.path, *short, ok=False), "dataset artifact, expected model")
    assert_clean_error(k2("sft", model.path, "--data", chats.path, *short, "--set", "data.mix={agentic=1.0, poems=1.0}", ok=False), "unknown SFT source")


def test_corpus_replay_trains_every_token_and_stays_out_of_validation(setup, k2):
    data, chats, model = setup
    tok = load_tokenizer(model.path)
    docs = [tok.encode(f"{n} was born in {c} in {y}.") for n, c, y in PEOPLE]
    convs = {"agentic": load_conversations("agentic", chats), "corpus": [{"ids": d} for d in docs]}
    sft = build_sft_data(tok, convs, SFTDataConfig(mix={"agentic": 1.0, "corpus": 2.0}), seq_len=192, seed=0)
    assert sft.counts["corpus"]["used"] == 12 and sft.counts["corpus"]["trained_tokens"] == 2 * sum(len(d) for d in docs)
    rows = sft.train.rows(np.arange(len(sft.train)))
    trained = tok.decode([int(t) for t in rows["targets"].flatten() if t != -100])
    assert "Anna Berg was born in Oslo in 1987." in trained  # the whole document is a target
    val = sft.val.rows(np.arange(len(sft.val)))
    assert "was born in" not in tok.decode([int(t) for t in val["input_ids"].flatten()])  # validation: chats only
    # from the CLI: the corpus is named (or found in the lineage) and recorded as an input
    k2("sft", model.path, "--data", chats.path, "--set", "train.steps=2", "--set", "train.batch_size=2",
       "--set", "train.seq_len=192", "--set", f"data.corpus={data.path}", "--set", "data.mix={agentic=1.0, corpus=1.0}")
    from k2cli.artifacts import open_artifact

    art = open_artifact("sft:latest", kind="model")
    # 24 corpus documents, 1 held out as the pretrain split would (val_fraction 0.05): only training documents are replayed
    assert art.metrics["corpus_used"] == 23 and art.metrics["agentic_used"] == 6
    assert data.id in [i["id"] for i in art.manifest["inputs"]]


def test_replay_without_a_corpus_in_the_lineage_is_skipped_unless_named(setup, k2):
    _, chats, model = setup  # a model with no pretrain recipe in its lineage (like one imported from HF)
    args = ("sft", model.path, "--data", chats.path, "--set", "train.steps=1", "--set", "train.batch_size=2",
            "--set", "train.seq_len=192", "--set", "data.mix={agentic=1.0, corpus=0.5}")
    k2(*args)
    from k2cli.artifacts import open_artifact

    assert open_artifact("sft:latest", kind="model").metrics["agentic_used"] == 6  # trained, without replay
    assert_clean_error(k2(*args, "--set", "data.corpus=synth:v99", ok=False), "not found")  # named: it must exist
