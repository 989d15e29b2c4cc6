"""k2 eval: each suite scores a model that always answers right as 1 and one that never does as 0;
side-by-side tables; suites that do not apply are skipped with a reason; bad inputs."""

import json
import re

import pytest

from conftest import assert_clean_error
from helpers import PEOPLE, dataset_artifact, model_artifact
from k2cli.eval import knowledge
from k2cli.eval.knowledge import extract_answer, pass_at_k


@pytest.fixture
def models():
    data = dataset_artifact()
    texts = [f"{n} was born in {c} in {y}. Where was {n} born?" for n, c, y in PEOPLE] * 5
    base = model_artifact(texts, inputs=[data], stage="pretrain")
    chat = model_artifact(texts, inputs=[data], stage="sft")
    return data, base, chat


def oracle(correct: bool):
    """A stand-in for generation that reads the prompt and answers right (or wrong)."""
    truth = {f"{n} was born in": c for n, c, _ in PEOPLE} | {f"Where was {n} born?": c for n, c, _ in PEOPLE}

    def complete(ctx, prompts, max_new_tokens, samples=1):
        outs = []
        for ids in prompts:
            text = ctx.tokenizer.decode(ids)
            m = re.search(r"buys (\d+) apples", text)
            if m:
                value = 3 * int(m.group(1))
                outs.append([f" {value} coins. The answer is {value if correct else value + 1}."] * samples)
                continue
            key = next(k for k in truth if k in text)
            ans = truth[key] if correct else "Atlantis"
            outs.append([(f" {ans} in 1990." if "born in" in key and not text.endswith("<|im_middle|>") else f"{ans}<|im_end|>")] * samples)
        return outs

    return complete


@pytest.mark.parametrize("correct", [True, False])
def test_suites_score_known_behaviour(models, k2, monkeypatch, correct):
    data, base, chat = models
    monkeypatch.setattr(knowledge, "complete", oracle(correct))
    k2("eval", base.path, chat.path, "--suite", "knowledge,math", "--label", "base", "--label", "chat")
    results = json.loads((__import__("k2cli.artifacts", fromlist=["x"]).resolve("eval:latest") / "results.json").read_text())
    for m in results["models"]:
        assert m["suites"]["knowledge"]["metrics"]["accuracy"] == (1.0 if correct else 0.0)
        assert m["suites"]["math"]["metrics"]["accuracy"] == (1.0 if correct else 0.0)


def test_real_models_side_by_side_and_skips(models, k2):
    data, base, chat = models
    r = k2("eval", base.path, chat.path, "--suite", "perplexity,max_logit,knowledge",
           "--set", "eval.max_examples=4", "--set", "eval.seq_len=32", ok=False)
    assert r.exit_code == 0, r.output
    from k2cli.artifacts import open_artifact

    art = open_artifact("eval:latest", kind="eval")
    report = art.file("report.md").read_text()
    assert "| perplexity | bits_per_byte |" in report and str(base.id) in report and str(chat.id) in report
    assert art.has("comparison.png")


def test_suite_that_does_not_apply_is_skipped_with_reason(k2, tmp_path):
    texts = ["plain text without any world"] * 20
    lonely = model_artifact(texts)  # no dataset in its lineage
    k2("eval", lonely.path, "--suite", "knowledge")
    from k2cli.artifacts import open_artifact

    results = json.loads(open_artifact("eval:latest").file("results.json").read_text())
    assert "qa_test" in results["models"][0]["suites"]["knowledge"]["skipped"]


def test_eval_bad_inputs(models, k2, tmp_path):
    data, base, _ = models
    assert_clean_error(k2("eval", base.path, "--suite", "knowlege", ok=False), "unknown eval suite", "knowledge")
    assert_clean_error(k2("eval", data.path, ok=False), "dataset artifact, expected model")
    (base.path / "tokenizer.json").unlink()
    import json as _json

    m = _json.loads((base.path / "manifest.json").read_text())
    m["files"].pop("tokenizer.json")
    (base.path / "manifest.json").write_text(_json.dumps(m))
    assert_clean_error(k2("eval", base.path, "--suite", "perplexity", ok=False), "no tokenizer")


def test_answer_extraction_and_pass_at_k():
    assert extract_answer("Solution: 2 * 3 = 6. The answer is 6.") == "6"
    assert extract_answer("it is 7 or maybe 9") == "9"
    assert extract_answer("no idea") is None
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 1) == 1.0 and pass_at_k(4, 2, 1) == pytest.approx(0.5)


def test_eval_data_names_any_corpus_for_perplexity(k2, tmp_path, artifacts_root):
    """`k2 eval MODEL --data file.jsonl`: perplexity on text that is not a k2 artifact."""
    import json as _json

    k2("data", "synth", "--preset", "micro")
    k2("rephrase", "--preset", "micro")
    k2("pretrain", "--preset", "micro", "--set", "train.steps=2")
    texts = [f"City {i} lies on the river {i % 3}; its people trade salt and wool." for i in range(40)]
    (tmp_path / "mine.jsonl").write_text("".join(_json.dumps({"text": t}) + "\n" for t in texts))
    k2("eval", "pretrain:latest", "--suite", "perplexity", "--data", tmp_path / "mine.jsonl", "--set", "eval.seq_len=64")
    results = _json.loads((artifacts_root / "eval" / "latest" / "results.json").read_text())["models"][0]["suites"]["perplexity"]
    assert results["metrics"]["loss"] > 0 and any("mine.jsonl" in n for n in results.get("notes", [])), results
