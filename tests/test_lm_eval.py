"""`k2 eval MODEL --suite lm-eval:TASK`: EleutherAI's lm-evaluation-harness on a k2 model, in-process.

Offline: two tiny tasks (multiple choice, generate_until) are task YAMLs over local JSON files. The bridge's
numbers are checked against k2's own forward pass and generation, not just for having run.
Needs the lmeval extra (`make test-lmeval` installs it); without it these tests skip, except the ones
that check what happens without it.
"""

import importlib.util
import json

import pytest
import torch

from conftest import assert_clean_error
from helpers import model_artifact
from k2cli.artifacts import resolve
from k2cli.data.tokenizer import load_tokenizer
from k2cli.eval.suite import parse_suites
from k2cli.model.generate import generate
from k2cli.model.io import load_model

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="the lmeval extra is not installed (make test-lmeval installs it and runs this file)")

TEXTS = ["The cat sat on the mat. The dog ran to the park. A bird sang in the tree.",
         "Question: What sat on the mat? Answer: the cat. Question: Where did the dog run? Answer: the park."] * 10
MC = [{"question": "What sat on the mat?", "choices": ["the cat", "the dog", "a bird"], "label": 0},
      {"question": "Where did the dog run?", "choices": ["the mat", "the park", "the tree"], "label": 1},
      {"question": "What sang in the tree?", "choices": ["a bird", "the cat"], "label": 0},
      {"question": "Who ran?", "choices": ["the dog", "the bird", "the mat", "the tree"], "label": 0}]
GEN = [{"question": "Question: What sat on the mat? Answer:", "answer": "the cat"},
       {"question": "Question: Where did the dog run? Answer:", "answer": "the park"}]


def write_tasks(folder):
    """Two harness tasks over local JSON lines: the harness reads them with `datasets`' json builder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC))
    (folder / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in GEN))
    (folder / "k2_tiny_mc.yaml").write_text(f"""task: k2_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (folder / "k2_tiny_gen.yaml").write_text(f"""task: k2_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 12
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return folder


@torch.no_grad()
def reference_loglikelihood(model, ids: list[int], n_cont: int) -> float:
    """k2's own log-softmax: sum of log P(ids[t] | ids[:t]) over the last n_cont tokens, one row, no padding."""
    logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).float()[0], dim=-1)  # [T - 1, V]
    target = torch.tensor(ids[1:])
    return float(logp[-n_cont:].gather(-1, target[-n_cont:, None]).sum())


def split_pair(tok, context: str, continuation: str):
    """The context's tokens and the continuation's (the tokens of context + continuation after the context's)."""
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


@pytest.fixture
def micro():
    """A micro model whose context (48 tokens) is short enough for left truncation to happen in tests."""
    art = model_artifact(TEXTS, max_position_embeddings=48)
    model, _ = load_model(art.path)
    return art, model, load_tokenizer(art.path)


def test_parse_suites_keeps_a_family_parameter_whole():
    assert parse_suites("perplexity,lm-eval:hellaswag,arc_easy,max_logit") == ["perplexity", "lm-eval:hellaswag,arc_easy", "max_logit"]
    assert parse_suites("lm-eval:a, lm-eval:b") == ["lm-eval:a", "lm-eval:b"]
    assert parse_suites("knowledge,math") == ["knowledge", "math"]


def test_without_the_extra_one_clean_error(k2, micro, monkeypatch):
    from k2cli.eval import lm_eval_bridge

    monkeypatch.setattr(lm_eval_bridge, "TemplateLM", object)  # as when lm_eval is not installed
    assert_clean_error(k2("eval", micro[0].path, "--suite", "lm-eval:hellaswag", ok=False), "lm-evaluation-harness", "k2cli[lmeval]")
    assert_clean_error(k2("eval", micro[0].path, "--suite", "lm-evall:hellaswag", ok=False), "unknown eval suite family", "lm-eval")


@needs_lm_eval
def test_bridge_matches_k2_log_softmax_and_stops_at_until(micro):
    from lm_eval.api.instance import Instance

    from k2cli.eval.lm_eval_bridge import K2LM

    art, model, tok = micro
    lm = K2LM(model, tok, batch_size=3)
    long_context = " ".join(TEXTS[:3])  # > 48 tokens: the bridge keeps the last 49 of context + continuation
    pairs = [("The cat sat on the", " mat."), ("Question: Where did the dog run? Answer:", " the park."),
             (long_context + " The dog", " ran to the park."), ("", "The bird"), ("A bird", " sang")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for (context, continuation), (logp, greedy) in zip(pairs, got):
        ctx, cont = split_pair(tok, context, continuation) if context else ([tok.eot_id], tok.encode(continuation))
        ids = (ctx + cont)[-(48 + 1):]
        assert len(ids) <= 49 and logp < 0
        assert logp == pytest.approx(reference_loglikelihood(model, ids, len(cont)), abs=1e-4)
        with torch.no_grad():  # greedy: every continuation token is the argmax after its prefix
            argmax = model(torch.tensor([ids[:-1]]))[0, -len(cont):].argmax(-1)
        assert greedy == bool((argmax == torch.tensor(cont)).all())

    # rolling: each token scored once, in chunks of 48 after <|endoftext|>; each chunk is read with the
    # longest context that fits (the last, partial one sees the 48 tokens before its end)
    text = " ".join(TEXTS[:5])  # two full windows and a part of one
    toks = tok.encode(text)
    assert len(toks) > 2 * 48 and len(toks) % 48
    padded = [tok.eot_id] + toks
    expected = sum(reference_loglikelihood(model, padded[max(0, s + n - 48): s + n + 1], n)
                   for s in range(0, len(toks), 48) for n in [min(48, len(toks) - s)])
    (rolled,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert rolled == pytest.approx(expected, abs=1e-3)

    # generate_until: greedy text, cut before the first `until` string
    prompts = ["The cat sat", "Question: Where did the dog run? Answer:"]
    full = []
    for p in prompts:
        g = generate(model, [tok.encode(p)], max_new_tokens=16, stop_ids=tok.stop_ids)[0]
        full.append(tok.decode(g[:-1] if g and g[-1] in tok.stop_ids else g))
    assert all(len(f) >= 6 for f in full), full  # the micro model says something to cut
    until = [f[len(f) // 2: len(f) // 2 + 2] for f in full]
    reqs = [Instance("generate_until", {}, (p, {"until": [u], "max_gen_toks": 16}), i) for i, (p, u) in enumerate(zip(prompts, until))]
    reqs.append(Instance("generate_until", {}, (prompts[0], {"until": ["never there"], "max_gen_toks": 16}), 2))
    out = lm.generate_until(reqs)
    for o, f, u in zip(out, full, until):
        assert o == f[: f.find(u)] and u not in o and len(o) < len(f)
    assert out[2] == full[0]  # no stop string met: the whole generation


@needs_lm_eval
def test_k2_eval_runs_local_harness_tasks(k2, micro, tmp_path):
    art, model, tok = micro
    tasks = write_tasks(tmp_path / "tasks")
    k2("eval", art.path, "--suite", "lm-eval:k2_tiny_mc,k2_tiny_gen", "--set", f"eval.lm_eval_include={tasks}",
       "--set", "eval.batch_size=2")
    results = json.loads((resolve("eval:latest") / "results.json").read_text())["models"][0]["suites"]
    suite = results["lm-eval:k2_tiny_mc,k2_tiny_gen"]
    acc, em = suite["metrics"]["k2_tiny_mc/acc"], suite["metrics"]["k2_tiny_gen/exact_match"]
    assert 0.0 <= acc <= 1.0 and 0.0 <= em <= 1.0

    # the harness's accuracy is k2's: the choice with the highest log-likelihood, per question
    right = 0
    for d in MC:
        context = f"Question: {d['question']}\nAnswer:"
        pairs = [split_pair(tok, context, " " + c) for c in d["choices"]]
        scores = [reference_loglikelihood(model, ctx + cont, len(cont)) for ctx, cont in pairs]
        right += int(max(range(len(scores)), key=scores.__getitem__) == d["label"])
    assert acc == pytest.approx(right / len(MC))
    assert {r["task"] for r in suite["rows"]} == {"k2_tiny_mc", "k2_tiny_gen"}
    assert any("4 of 4 examples" in n for n in suite["notes"])


@needs_lm_eval
def test_unknown_lm_eval_task_is_one_clean_error(k2, micro):
    assert_clean_error(k2("eval", micro[0].path, "--suite", "lm-eval:hellaswagg", ok=False), "unknown lm-eval task 'hellaswagg'", "hellaswag")
    assert_clean_error(k2("eval", micro[0].path, "--suite", "lm-eval:", ok=False), "names no task")
