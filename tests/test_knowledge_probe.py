"""The knowledge-probe suite (k2cli/eval/knowledge_probe.py): its phrasings are held out from every training
text, its scores are right for a model that knows (and one that does not), its one-forward greedy exact
match is what greedy decoding writes, and `k2 eval` writes paired, deterministic per-example rows."""

import json
import re

import pytest
import torch

from helpers import model_artifact
from k2cli.data.rephrase.builtin import KNOWLEDGE
from k2cli.data.synth import BIO_TEMPLATES, CLOZES, QUESTIONS, math_document, math_problems
from k2cli.data.world import ATTRIBUTES, build_world
from k2cli.eval.knowledge_probe import HELD_OUT, examples, prompt_and_value, score_values
from k2cli.model.generate import generate

# ----------------------------------------------------------------------------- held out from every training text


def words(template: str) -> list[str]:
    """Lower-case words of a template, a subject slot as <n> (a possessive as <n> s), an attribute slot as <v>."""
    t = re.sub(r"\{[NSs]\}", " <n> ", template)
    t = re.sub(r"\{[Pp]\}", " <n> s ", t)
    t = re.sub(r"\{\w+\}", " <v> ", t)
    return re.findall(r"<[nv]>|[a-z0-9]+", t.lower())


def trigrams(ws: list[str]) -> set[tuple]:
    return {tuple(ws[i : i + 3]) for i in range(len(ws) - 2)}


def training_templates() -> list[str]:
    """Every template a training text of this project is written from: biographies, the QA fine-tune's
    questions, the cloze prompts, and every style of the builtin rewriter."""
    out = [t for ts in BIO_TEMPLATES.values() for t in ts] + list(QUESTIONS.values()) + list(CLOZES.values())
    for st in KNOWLEDGE.values():
        out += st.facts + st.opener + st.mention
    return out


def test_held_out_phrasings_share_no_word_trigram_with_any_training_template():
    seen = set().union(*(trigrams(words(t)) for t in training_templates()))
    assert len(seen) > 300  # the check reads the real template libraries
    for attr, templates in HELD_OUT.items():
        for t in templates:
            shared = trigrams(words(t)) & seen
            assert not shared, (t, shared)


def test_held_out_phrasings_share_no_word_trigram_with_math_documents():
    """Math word problems name people, companies and cities in running text (the K2 corpus mixes them in)."""
    world = build_world(60, seed=0)
    docs = [math_document(r) for r in math_problems(world, 300, seed=0)]
    seen = set().union(*(trigrams(re.findall(r"[a-z0-9]+", d.lower())) for d in docs))
    for templates in HELD_OUT.values():
        for t in templates:
            for piece in re.split(r"\{\w+\}", t):  # the fixed text between the slots
                shared = trigrams(re.findall(r"[a-z0-9]+", piece.lower())) & seen
                assert not shared, (t, shared)


def test_each_phrasing_names_the_person_once_and_ends_before_its_value():
    assert set(HELD_OUT) == set(ATTRIBUTES)
    for attr, templates in HELD_OUT.items():
        assert len(set(templates)) == 2
        for t in templates:
            assert t.count("{N}") == 1 and t.endswith("{" + attr + "}"), t
            prompt, value = prompt_and_value(t, "Anna Avery Berg", "Oslo")
            assert "Anna Avery Berg" in prompt and "{" not in prompt and value == " Oslo"
            assert prompt + value == t.replace("{N}", "Anna Avery Berg").replace("{" + attr + "}", "Oslo")


# ----------------------------------------------------------------------------- scoring


class Oracle(torch.nn.Module):
    """A 'model' that knows the continuation of every sequence it was told (right=True), or always
    predicts another token (right=False): logits are one-hot-ish on the next token."""

    def __init__(self, sequences, vocab, right=True):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.next = {tuple(s[: i + 1]): s[i + 1] for s in sequences for i in range(len(s) - 1)}
        self.vocab, self.right = vocab, right

    def forward(self, ids):
        B, T = ids.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            for t in range(T):
                nxt = self.next.get(tuple(ids[b, : t + 1].tolist()), 0)
                logits[b, t, nxt if self.right else (nxt + 1) % self.vocab] = 30.0
        return logits


@pytest.mark.parametrize("right", [True, False])
def test_scores_of_a_model_that_knows_and_one_that_does_not(right):
    pairs = [([9, 1, 2], [3, 4]), ([9, 5], [6, 7, 8]), ([9, 1, 7, 7, 7], [4])]  # different lengths: right padding
    model = Oracle([p + v for p, v in pairs], vocab=12, right=right)
    for (p, v), (lps, hits) in zip(pairs, score_values(model, pairs, batch_size=2, pad_id=0)):
        assert len(lps) == len(hits) == len(v)
        assert hits == [right] * len(v)
        assert (sum(lps) > -1e-6) if right else (sum(lps) < -10 * len(v))


def test_teacher_forced_exact_match_is_what_greedy_decoding_writes():
    """A random micro model's own greedy continuation scores exact; one changed token does not, and the
    log-probabilities are those of a plain forward pass."""
    tm = model_artifact(["Anna Berg was born in Oslo.", "Boris Costa studied at Lakeside University."] * 20, vocab_size=300)
    from k2cli.model.io import load_model

    model, _ = load_model(str(tm.path))
    model.eval()
    prompts = [[5, 17, 33, 2], [8, 9], [40, 41, 42, 43, 44, 45]]
    greedy = [g[:4] for g in generate(model, prompts, max_new_tokens=4, temperature=0.0, stop_ids=[])]
    wrong = [g[:2] + [(g[2] + 1) % 300] + g[3:] for g in greedy]
    scored = score_values(model, list(zip(prompts, greedy)), batch_size=2, pad_id=0)
    assert all(all(h) for _, h in scored)
    for (lps, hits), p, g in zip(score_values(model, list(zip(prompts, wrong)), batch_size=3, pad_id=0), prompts, greedy):
        assert hits[:2] == [True, True] and hits[2] is False
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompts[0] + greedy[0][:-1]])).float(), -1)[0]
    expect = [float(logp[len(prompts[0]) - 1 + i, greedy[0][i]]) for i in range(4)]
    assert scored[0][0] == pytest.approx(expect, abs=1e-4)


# ----------------------------------------------------------------------------- through `k2 eval`


def test_k2_eval_writes_metrics_and_paired_deterministic_rows(k2, artifacts_root):
    from k2cli.artifacts import open_artifact
    from k2cli.data.loading import load_corpus

    k2("data", "synth", "--preset", "micro", "--set", "world.size=10", "--set", "math.count=0")
    data = open_artifact("synth:latest")
    texts = load_corpus(str(data.path))[0]["text"]
    a = model_artifact(texts, inputs=[data], stage="pretrain")
    b = model_artifact(texts, inputs=[data], stage="pretrain", hidden_size=16)
    chat = model_artifact(texts, inputs=[data], stage="sft")
    k2("eval", a.path, b.path, chat.path, "--suite", "knowledge-probe", "--label", "a", "--label", "b", "--label", "chat",
       "--set", "eval.max_examples=3", "--set", "eval.batch_size=7")
    ev = artifacts_root / "eval" / "latest"
    models = {m["label"]: m["suites"]["knowledge-probe"] for m in json.loads((ev / "results.json").read_text())["models"]}
    assert "chat model" in models["chat"]["skipped"]
    rows = {}
    for label in ("a", "b"):
        m = models[label]["metrics"]
        assert m["train_people"] == m["test_people"] == 3
        assert m["test_logprob"] < m["test_logprob_per_token"] < 0 and 0 <= m["test_exact"] <= m["test_token_acc"] <= 1
        assert {f"test_{a}_exact" for a in ATTRIBUTES} <= set(m) and {f"train_{a}_logprob" for a in ATTRIBUTES} <= set(m)
        (name,) = models[label]["files"]
        rows[label] = [json.loads(line) for line in (ev / name).read_text().splitlines()]
        assert len(rows[label]) == 2 * 3 * len(ATTRIBUTES) * 2
    # the same examples in the same order for both models: rows pair one to one
    key = lambda r: (r["split"], r["person_id"], r["attribute"], r["template"], r["prompt"], r["value"])
    assert [key(r) for r in rows["a"]] == [key(r) for r in rows["b"]]
    assert [r["logprob"] for r in rows["a"]] != [r["logprob"] for r in rows["b"]]
    # the people of each split are the dataset's QA split
    from k2cli.data.loading import load_part

    test_ids = set(load_part(data, "qa_test")["person_id"])
    assert {r["person_id"] for r in rows["a"] if r["split"] == "test"} <= test_ids
    assert not {r["person_id"] for r in rows["a"] if r["split"] == "train"} & test_ids
    # the test split's metric is the mean of its rows
    test_rows = [r for r in rows["a"] if r["split"] == "test"]
    assert models["a"]["metrics"]["test_logprob"] == pytest.approx(sum(r["logprob"] for r in test_rows) / len(test_rows))
