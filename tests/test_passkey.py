"""The passkey suite: token-exact prompts in the YaRN protocol, seeded keys, scoring, lengths relative
to the original context, bad lengths, and `k2 eval --suite passkey` writing its table and plots."""

import dataclasses
import json

import pytest
import torch

from conftest import assert_clean_error
from helpers import PEOPLE, dataset_artifact, model_artifact
from k2cli.data.tokenizer import load_tokenizer
from k2cli.errors import K2Error
from k2cli.eval import passkey
from k2cli.eval.passkey import FILLER, PromptBuilder, cell_keys, first_integer, original_context, passkey_lengths
from k2cli.model.config import ModelConfig, RopeScaling

TEXTS = [f"{n} was born in {c} in {y}. {n} lives in {c}." for n, c, y in PEOPLE] * 5 + [FILLER, "The pass key is 123."]


@pytest.fixture
def model_art():
    data = dataset_artifact()
    return model_artifact(TEXTS, inputs=[data])


@pytest.fixture
def tok(model_art):
    return load_tokenizer(model_art.path)


def test_prompt_is_exact_length_with_the_key_at_the_depth(tok):
    b = PromptBuilder(tok)
    for length in (120, 257, 600):
        for depth in (0.0, 0.5, 1.0):
            ids = b.build(length, depth, 48213)
            assert len(ids) == length and ids[0] == tok.eot_id
            text = tok.decode(ids)
            assert "\nThe pass key is 48213. Remember it. 48213 is the pass key.\n" in text
            assert text.endswith("\nWhat is the pass key? The pass key is")
            assert "The grass is green. The sky is blue." in text
            if length == 600:
                assert text.count(FILLER) >= 4
            before = text.split("\nThe pass key is 48213")[0]
            filler_tokens = length - b.fixed_length(48213)
            got = len(tok.encode(before.replace("<|endoftext|>", ""))) / filler_tokens
            assert abs(got - depth) < 0.05, (length, depth, got)


def test_keys_are_seeded_five_digit_numbers():
    a, b = cell_keys(0, 512, 0.5, 20), cell_keys(0, 512, 0.5, 20)
    assert a == b and all(10000 <= k <= 99999 for k in a) and len(set(a)) > 15
    assert cell_keys(1, 512, 0.5, 20) != a and cell_keys(0, 512, 0.3, 20) != a


def test_first_integer():
    assert first_integer(" 48213. Remember") == 48213
    assert first_integer(" the key 123 and 456") == 123
    assert first_integer(" no digits") is None


def test_original_context_rules():
    plain = ModelConfig(max_position_embeddings=256)
    scaled = dataclasses.replace(plain, max_position_embeddings=1024,
                                 rope_scaling=RopeScaling(factor=4, original_max_position_embeddings=256))
    assert original_context(plain) == 256
    assert original_context(scaled) == 256
    assert original_context(scaled, override=300) == 300
    assert passkey_lengths(256, [0.5, 1, 4]) == [128, 256, 1024]


def test_scoring_batches_and_counts(tok, monkeypatch):
    """A stub generator that answers from the prompt scores 100%; one that answers a fixed key ~0%."""
    calls = []

    def oracle(model, prompts, max_new_tokens, temperature):
        calls.append(len(prompts))
        assert len({len(p) for p in prompts}) == 1  # one length per batch: no padding
        return [tok.encode(f" {first_integer(tok.decode(p).split('The pass key is')[1])}.") for p in prompts]

    monkeypatch.setattr(passkey, "generate", oracle)
    rows = passkey.run_passkey(None, tok, [200, 400], [0.2, 0.8], trials=3, seed=0, batch_size=4, orig=200)
    assert [(r["length"], r["depth"], r["trials"], r["accuracy"]) for r in rows] == \
        [(200, 0.2, 3, 1.0), (200, 0.8, 3, 1.0), (400, 0.2, 3, 1.0), (400, 0.8, 3, 1.0)]
    assert calls == [4, 2, 2, 2, 2]  # 4 per batch at the original length, 2 at twice it
    m = passkey.passkey_metrics(rows, 200)
    assert m["accuracy_400"] == 1.0 and m["accuracy_beyond"] == 1.0 and m["trials_per_length"] == 6

    monkeypatch.setattr(passkey, "generate", lambda model, prompts, **kw: [tok.encode(" 11111") for _ in prompts])
    rows = passkey.run_passkey(None, tok, [200], [0.5], trials=4, seed=0, batch_size=4, orig=200)
    assert rows[0]["accuracy"] == 0.0


def test_lengths_the_suite_cannot_build_or_allow(tok):
    with pytest.raises(K2Error, match="cannot be built"):
        PromptBuilder(tok).check_length(20)
    with pytest.raises(K2Error, match="outside what the suite allows"):
        passkey_lengths(256, [1, 32])
    with pytest.raises(K2Error, match="outside"):
        passkey.check_depths([0.5, 1.5])


def test_eval_passkey_command_writes_table_and_plots(model_art, k2):
    k2("eval", model_art.path, "--suite", "passkey", "--set", "eval.passkey_trials=2", "--set", "eval.passkey_lengths=[1.0, 2.0]",
       "--set", "eval.passkey_depths=[0.25, 0.75]", "--set", "eval.position_loss_sequences=2", "--label", "micro")
    from k2cli.artifacts import open_artifact

    art = open_artifact("eval:latest", kind="eval")
    res = json.loads(art.file("results.json").read_text())["models"][0]["suites"]["passkey"]
    m = res["metrics"]
    assert m["trials_per_length"] == 4 and 0 <= m["accuracy_512"] <= 1 and "accuracy_256" in m
    assert m["loss_beyond"] > 0 and m["loss_within"] > 0  # loss by position over 2x the context
    cells = [r for r in res["rows"] if r["kind"] == "passkey"]
    assert {(r["length"], r["depth"]) for r in cells} == {(256, 0.25), (256, 0.75), (512, 0.25), (512, 0.75)}
    for name in ("passkey-micro.png", "position-loss-micro.png", "passkey-micro.md"):
        assert art.has(name), name
    assert "| 512 | 2 |" in art.file("passkey-micro.md").read_text()


def test_eval_passkey_bad_lengths_are_clean_errors(model_art, k2):
    assert_clean_error(k2("eval", model_art.path, "--suite", "passkey", "--set", "eval.passkey_lengths=[0.05]", ok=False),
                       "cannot be built")
    assert_clean_error(k2("eval", model_art.path, "--suite", "passkey", "--set", "eval.passkey_lengths=[1, 64]", ok=False),
                       "outside what the suite allows")
