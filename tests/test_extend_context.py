"""k2 extend-context: the scaled config, the training mix, outputs and lineage, HF export beyond the
original context, exact resume after SIGINT, and clean errors for bad requests (micro sizes)."""

import json
import os
import random
import re
import signal

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import assert_clean_error
from helpers import model_artifact
from k2cli.artifacts import open_artifact
from k2cli.data.long_context import FACT, copy_row, long_document, needle_row, retrieval_row, source_counts
from k2cli.data.tokenizer import load_tokenizer
from k2cli.data.world import load_world
from k2cli.errors import Interrupted
from k2cli.model.config import RopeScaling
from k2cli.recipes import resolve_recipe
from k2cli.stages import extend_context
from k2cli.stages.extend_context import ExtendRecipe
from k2cli.stages.runner import RunOptions
from k2cli.train.lm_task import LMTask

QUICK = ("--preset", "micro", "--set", "eval.suites=[]")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A micro synthetic world and a micro model pre-trained on it (256 positions), shared by the module."""
    from k2cli.cli import cli

    root = tmp_path_factory.mktemp("base") / "artifacts"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("K2_ARTIFACTS", str(root))
        mp.setenv("K2_QUIET", "1")
        runner = CliRunner()
        for args in (["data", "synth", "--preset", "micro"],
                     ["pretrain", str(root / "synth" / "v1"), "--preset", "micro", "--set", "train.steps=4"]):
            r = runner.invoke(cli, args, catch_exceptions=False)
            assert r.exit_code == 0, r.output
    return {"model": str(root / "pretrain" / "v1"), "data": str(root / "synth" / "v1")}


def test_training_rows_hide_facts_not_passkeys(base):
    tok = load_tokenizer(base["model"])
    world = load_world(base["data"])
    docs = [tok.encode(f"{p.name} works in a city far away.") for p in world.people[:10]]
    rng = random.Random(0)
    for _ in range(5):
        ids, mask = retrieval_row(docs, tok, world, 300, 3, 2, rng)
        assert len(ids) == len(mask) == 301 and ids[0] == tok.eot_id
        text = tok.decode(ids)
        assert "pass key" not in text and "grass" not in text  # not the evaluation's wording
        facts = re.findall(r"\nThe code of ([^?.\n]+) is (\d{5})\.\n", text)
        asked = re.findall(r"What is the code of ([^?]+)\? The code of \1 is (\d{5})\.", text)
        assert len(facts) == 3 and len(asked) == 2
        assert set(asked) <= set(facts)  # every question is answered with the code stated earlier
        assert text.endswith(f"What is the code of {asked[-1][0]}? The code of {asked[-1][0]} is {asked[-1][1]}.")
        # the codes where they first appear are not loss targets; everything else is
        hidden = tok.decode([t for t, m in zip(ids, mask) if not m])
        assert len(hidden.split()) == 3 and all(w.isdigit() and len(w) == 5 for w in hidden.split())
    ids, mask = retrieval_row(docs, tok, world, 300, 3, 2, rng, answers_only=True)  # the recipe default
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert re.fullmatch(r"( The code of [^?.]+ is \d{5}\.){2}", trained), trained
    doc, mask = long_document(world, docs, tok, 1200, rng)
    assert len(doc) == len(mask) == 1200
    text = tok.decode(doc)
    assert text.startswith("Visitor badge register of")
    section = text.split("\n\n")[0]
    badges = re.findall(r"Entry \d+: ([^,]+), badge (\d{5})", section)
    index = re.findall(r" ([A-Z][a-z]+ [A-Z][a-z]+ [A-Z][a-z]+) (\d{5});", section.split("Badge index:")[1])
    assert len(badges) >= 4 and index == badges  # the index repeats the register verbatim, in order
    hidden = tok.decode([t for t, m in zip(doc, mask) if not m]).split()
    assert hidden[: len(badges)] == [b for _, b in badges]  # first appearances are not targets; the index is
    assert source_counts({"corpus": 0.4, "long_docs": 0.2, "retrieval": 0.4}, 101) == \
        {"corpus": 41, "long_docs": 20, "retrieval": 40, "copy": 0, "needles": 0}
    assert source_counts({"corpus": 0.3, "long_docs": 0.1, "retrieval": 0.4, "copy": 0.2}, 10) == \
        {"corpus": 3, "long_docs": 1, "retrieval": 4, "copy": 2, "needles": 0}
    assert FACT.format(subject="X", code=1) == "The code of X is 1."


def test_needle_rows_ask_every_hidden_fact_without_the_probe_wording(base):
    tok = load_tokenizer(base["model"])
    docs = [tok.encode(f"Document {i} says nothing about codes at all.") for i in range(20)]
    rng = random.Random(0)
    kinds, depths = set(), []
    for _ in range(40):
        ids, mask = needle_row(docs, tok, 400, rng, max_needles=3)
        assert len(ids) == len(mask) == 401 and ids[0] == tok.eot_id
        text = tok.decode(ids)
        # the passkey suite's own words never appear: it measures transfer, not a memorised prompt
        assert not re.search(r"pass key|grass|\bsky\b|\bsun\b|green|blue|yellow|here we go|there and back", text, re.I), text
        asked = re.findall(r"\nWhat is the ([a-z ]+)\? The \1 is (\d{5})\.", text)
        assert 1 <= len(asked) <= 3 and text.endswith(f" {asked[-1][1]}.")
        subjects = [s for s, _ in asked]
        assert len(set(subjects)) == len(subjects)  # distinct subjects: a question is answered by matching its subject
        head = text[: text.index("\nWhat is the ")]
        for subject, code in asked:  # each answer is the code the haystack states for that subject
            assert re.search(rf"(the {subject} is {code}|{code} is the {subject})", head, re.IGNORECASE), (subject, code)
            depths.append(head.lower().find(subject) / len(head))
        trained = tok.decode([t for t, m in zip(ids, mask) if m])
        assert trained == "".join(f" {c}." for _, c in asked)  # only the answers are loss targets
        kinds.add("Document" in head)
    assert kinds == {True, False}  # haystacks of documents and of one repeated passage
    assert min(depths) < 0.2 and max(depths) > 0.8  # the facts sit anywhere in the haystack


def test_copy_rows_repeat_random_codes_and_train_only_the_repetition(base):
    tok = load_tokenizer(base["model"])
    docs = [tok.encode(f"Document {i} says nothing about codes at all.") for i in range(20)]
    rng = random.Random(0)
    distances = []
    for _ in range(20):
        ids, mask = copy_row(docs, tok, 300, rng)
        assert len(ids) == len(mask) == 301 and ids[0] == tok.eot_id
        text = tok.decode(ids)
        first = re.search(r"Codes:((?: \d{5})+)\.", text)
        again = re.search(r"\nAgain:((?: \d{5})+)\.", text)
        assert first and again and first.group(1) == again.group(1)  # verbatim repetition
        assert 2 <= len(first.group(1).split()) <= 8
        trained = tok.decode([t for t, m in zip(ids, mask) if m])
        assert trained == "\nAgain:" + again.group(1) + "."  # answers only: the repetition, nothing else
        distances.append(again.start() - first.end())
    assert min(distances) < 40 and max(distances) > 200  # the copying distance spans the row
    ids, mask = copy_row(docs, tok, 200, rng, answers_only=False)
    hidden = tok.decode([t for t, m in zip(ids, mask) if not m])
    assert re.fullmatch(r"Codes:( \d{5})+\.", hidden), hidden  # without answers_only only the first list is hidden


def test_pretrain_can_mix_retrieval_rows_into_its_corpus(base, k2):
    """data.mix in pretrain: needle and retrieval rows at the pre-training length (the tiny recipe's way of
    giving the parent something to extend); the default stays the corpus alone."""
    mix = ("--set", "data.mix={corpus=0.5, needles=0.25, retrieval=0.25}")
    k2("pretrain", base["data"], "--preset", "micro", "--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "train.seq_len=256", *mix,
       "--out", "pt-mix")
    art = open_artifact("pt-mix:latest", kind="model")
    m = art.metrics
    assert (m["rows_corpus"], m["rows_needles"], m["rows_retrieval"], m["rows_copy"]) == (8, 4, 4, 0)  # of 2 x 8 rows
    assert "needles 4" in art.file("summary.md").read_text()
    assert m["final_val_loss"] > 0  # validation stays the corpus's held-out rows
    assert not any(k.startswith("rows_") for k in open_artifact(base["model"]).metrics)  # corpus only by default
    assert_clean_error(k2("pretrain", base["data"], "--preset", "micro", "--set", "data.mix={corpus=1, passkeys=1}",
                          ok=False), "unknown long-context source 'passkeys'")


def test_pretrain_init_continues_a_model_with_its_tokenizer_and_shape(base, k2):
    """--init (the midtrain step): the parent's weights, config and tokenizer, the parent in the lineage."""
    k2("pretrain", base["data"], "--preset", "micro", "--init", base["model"], "--set", "train.steps=1",
       "--set", "optim.lr=1e-12", "--set", "schedule.warmup_steps=0", "--set", "train.bias_update_rate=0", "--out", "cont")
    art, parent = open_artifact("cont:latest", kind="model"), open_artifact(base["model"])
    assert art.file("model.json").read_text() == parent.file("model.json").read_text()
    assert art.file("tokenizer.json").read_bytes() == parent.file("tokenizer.json").read_bytes()
    after, before = load_file(art.file("model.safetensors")), load_file(parent.file("model.safetensors"))
    assert after.keys() == before.keys() and all(torch.allclose(after[k], before[k], atol=1e-6) for k in after)
    assert {"model": "pretrain/v1", "dataset": "synth/v1"} == {i["kind"]: i["id"] for i in art.manifest["inputs"]}
    assert "continued from" in art.file("summary.md").read_text()
    assert_clean_error(k2("pretrain", base["data"], "--preset", "micro", "--init", base["data"], ok=False),
                       "dataset artifact, expected model")
    assert_clean_error(k2("pretrain", base["data"], "--preset", "micro", "--init", base["model"], "--set", "seed=3", ok=False),
                       "would train on its held-out documents", "set seed=0 and data.val_fraction=0.1")
    assert_clean_error(k2("pretrain", base["data"], "--preset", "micro", "--init", base["model"], "--set",
                          f"tokenizer.ref={base['model']}", ok=False), "drop tokenizer.ref")


def test_yarn_extension_outputs_lineage_and_hf_export_beyond_the_original_context(base, k2, tmp_path):
    k2("extend-context", base["model"], "--preset", "micro", "--factor", 2, "--seq-len", 384)
    art = open_artifact("extend-context:latest", kind="model")
    cfg = json.loads(art.file("model.json").read_text())
    assert cfg["max_position_embeddings"] == 512
    assert cfg["rope_scaling"] == {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256, "beta_fast": 32.0,
                                   "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    m = art.metrics
    assert m["method"] == "yarn" and m["original_context"] == 256 and m["context"] == 512 and m["seq_len"] == 384
    assert sum(m[f"rows_{s}"] for s in ("corpus", "long_docs", "retrieval", "needles", "copy")) == 16  # steps x batch
    assert m["rows_needles"] > 0
    assert 0 <= m["passkey_accuracy_512"] <= 1 and 0 <= m["parent_passkey_accuracy_512"] <= 1  # before / after
    for name in ("model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png", "summary.md", "passkey.png",
                 "position-loss.png", "passkey.md", "passkey.json"):
        assert art.has(name), name
    assert "| 512 | 2 |" in art.file("passkey.md").read_text() and "passkey.png" in art.file("summary.md").read_text()
    assert {i["id"].split("/")[0] for i in art.manifest["inputs"]} == {"pretrain", "synth"}

    # the exported HF model carries the scaling; transformers agrees at 2x and 4x the original context
    transformers = pytest.importorskip("transformers")
    k2("export", art.path, "--out", tmp_path / "hf")
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["rope_scaling"]["type"] == "yarn" and hf_cfg["rope_scaling"]["original_max_position_embeddings"] == 256
    from helpers import hf_logit_gap, load_hf_float64
    from k2cli.model.io import load_model

    hf = load_hf_float64(tmp_path / "hf")
    ours, _ = load_model(art.path)
    for T in (512, 1024):
        x = torch.randint(0, cfg["vocab_size"], (1, T), generator=torch.Generator().manual_seed(T))
        assert hf_logit_gap(ours, hf, x) < 1e-9, T


def test_plain_extrapolation_keeps_the_original_context_on_record(base, k2):
    """--method none: no scaling, positions raised; the passkey lengths still multiply the parent's context.
    (linear and ntk configs: tests/test_rope.py::test_extended_config_for_each_method.)"""
    from k2cli.eval.passkey import original_context
    from k2cli.model.io import load_model

    k2("extend-context", base["model"], *QUICK, "--method", "none")
    art = open_artifact("extend-context:latest", kind="model")
    model, _ = load_model(art.path)
    assert model.config.rope_scaling is None and model.config.max_position_embeddings == 512
    assert art.metrics["original_context"] == 256 and original_context(model.config, art) == 256


class InterruptAt(LMTask):
    """The stage's task, sending SIGINT to this process while it builds the batch of step 1."""

    def batch(self, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return super().batch(step)


def test_sigint_then_resume_is_bitwise_identical(base, monkeypatch):
    recipe, _ = resolve_recipe(ExtendRecipe, "extend_context", "micro", None,
                               [f"model={base['model']}", "eval.suites=[]", "train.checkpoint_every=100"])
    monkeypatch.setattr(extend_context, "LMTask", InterruptAt)
    with pytest.raises(Interrupted, match="after step 2/4"):
        extend_context.run(recipe)
    monkeypatch.setattr(extend_context, "LMTask", LMTask)
    resumed = extend_context.run(recipe)  # the same command again: continues from step 2
    fresh = extend_context.run(recipe, RunOptions(resume="no"))  # --restart: from the parent again
    a, b = load_file(resumed.file("model.safetensors")), load_file(fresh.file("model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(line)["loss"] for line in resumed.file("metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(line)["loss"] for line in fresh.file("metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 4


def test_bad_requests_are_clean_errors(base, k2):
    m = base["model"]
    assert_clean_error(k2("extend-context", m, *QUICK, "--factor", 1, ok=False), "factor must be > 1")
    assert_clean_error(k2("extend-context", m, *QUICK, "--seq-len", 256, ok=False), "not larger than", "current context (256")
    assert_clean_error(k2("extend-context", m, *QUICK, "--seq-len", 1024, ok=False), "beyond the extended context")
    assert_clean_error(k2("extend-context", base["data"], *QUICK, ok=False), "dataset artifact, expected model")
    assert_clean_error(k2("extend-context", m, *QUICK, "--set", "data.needles=0", ok=False), "data.needles=0", "at least one fact")
    assert_clean_error(k2("extend-context", m, "--preset", "micro", "--set", "eval.passkey_lengths=[0.05]", ok=False),
                       "cannot be built")
    assert_clean_error(k2("extend-context", m, "--preset", "micro", "--set", "eval.passkey_lengths=[1, 40]", ok=False),
                       "outside what the suite allows")
    scaled = model_artifact(["a b c d e f g"] * 20, max_position_embeddings=512,
                            rope_scaling=RopeScaling(factor=2, original_max_position_embeddings=256))
    assert_clean_error(k2("extend-context", scaled.path, *QUICK, "--seq-len", 768, ok=False), "already has yarn rope scaling",
                       "--reextend")
    assert_clean_error(k2("extend-context", scaled.path, *QUICK, "--seq-len", 768, "--reextend", "--method", "none", ok=False),
                       "cannot re-extend")
    # --reextend passes the scaling check; this model has no corpus in its lineage, which is the next thing said
    assert_clean_error(k2("extend-context", scaled.path, *QUICK, "--seq-len", 768, "--reextend", ok=False),
                       "no pre-training corpus")
