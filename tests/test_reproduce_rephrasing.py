"""Experiment 2 (reproduce/experiments/rephrasing.py): fabricated artifacts prove each verdict of its three rules
(probe log-prob order, probe exact match, gated SFT QA, "probe failed" included), and the --quick preset runs
end to end on real micro artifacts."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from reproduce_fixtures import InProcessK2, fake, quick_context, run_section, verdicts
from reproduce import stats
from reproduce.experiments import rephrasing

PEOPLE, ATTRS = 10, ("birth_city", "employer")


def probe_rows(lp: float, exact: float, spread: float = 0.5) -> str:
    """knowledge-probe rows for 10 people x 2 attributes x 2 phrasings: log-prob lp per fact (+- a fixed,
    per-fact jitter of `spread`), the first round(exact x facts) facts exact."""
    rows, i = [], 0
    for p in range(PEOPLE):
        for a in ATTRS:
            for t in (0, 1):
                rows.append({"split": "test" if p % 2 else "train", "person_id": f"P{p:06d}", "attribute": a, "template": t,
                             "prompt": "...", "value": "Oslo", "logprob": lp + spread * math.sin(7 * i + t), "tokens": 2,
                             "exact": i < round(exact * PEOPLE * len(ATTRS)), "token_acc": 1.0})
            i += 1
    return "".join(json.dumps(r) + "\n" for r in rows)


def fabricate(ctx, probe: dict[str, tuple[float, float]], sft_train=0.95):
    import datasets
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["Anna", "Berg", "was", "born", "in", "Oslo", "works", "at", "Acme"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fake(ctx.root, "kn-tokenizer", kind="tokenizer", files={"tokenizer.json": tok.to_str()})
    for name, docs in {"kn-synth": 2, "kn-rw1": 2, "kn-rw10": 20}.items():
        fake(ctx.root, name, {"qa_test": 10}, kind="dataset")
        datasets.Dataset.from_dict({"text": ["Anna Berg was born in Oslo"] * docs, "doc_id": [str(i) for i in range(docs)]}
                                   ).save_to_disk(str(ctx.root / name / "v1" / "corpus"))
    files = {f"knowledge-probe.{k}.jsonl": probe_rows(lp, ex) for k, (lp, ex) in probe.items()}
    models = [{"label": k, "suites": {"knowledge-probe": {"metrics": {}, "files": [f"knowledge-probe.{k}.jsonl"]}}} for k in probe]
    fake(ctx.root, "kn-probe", kind="eval", files={"results.json": json.dumps({"models": models})} | files)
    acc = {"raw": 0.0, "rw1": 0.5, "rw10": 1.0}  # 8 questions each: every step beyond twice its standard error
    sft = [{"label": k, "suites": {"knowledge": {"metrics": {"accuracy": a, "accuracy_qa_train_people": sft_train,
                                                             "accuracy_birth_city": a}}}} for k, a in acc.items()]
    fake(ctx.root, "kn-eval-sft", kind="eval", files={"results.json": json.dumps({"models": sft})})


ORDERED = {"raw": (-10.0, 0.0), "rw1": (-8.0, 0.5), "rw10": (-6.0, 1.0), "raw-s1": (-10.2, 0.0), "rw10-s1": (-6.1, 1.0)}


def test_rephrasing_reads_the_probe_and_the_gated_sft_probe(tmp_path):
    ctx = quick_context(tmp_path)
    fabricate(ctx, ORDERED)
    sec = run_section(rephrasing, ctx)
    v = verdicts(sec)
    assert v[0].startswith("reproduced (2 s.e.: rw1-raw") and "seed sd 0.071" in v[0]  # |(-6+10) - (-6.1+10.2)| / sqrt 2
    assert v[1].startswith("reproduced (2 s.e. =") and v[2].startswith("reproduced (2 s.e. =")
    cmds = ctx.k2.commands["rephrasing"]
    assert "--set train.steps=2 " in cmds[4]  # 20 x 7 tokens of the 10-rewrite corpus: 1 row
    assert [c.split("--out ")[1] for c in cmds[4:9]] == ["kn-pt-raw", "kn-pt-rw1", "kn-pt-rw10", "kn-pt-raw-s1", "kn-pt-rw10-s1"]
    assert "--set seed=1 " in cmds[7] and "--suite knowledge-probe" in cmds[9] and "--label rw10-s1" in cmds[9]
    text = "\n".join(sec.body)
    m = rephrasing.measure(ctx, 2)
    # 2 documents x (6 words + end-of-text); 1,024 tokens / 14 = 73 passes over one biography per person
    assert f"| raw x 10 epochs | 14 | 73 | {m.lp('raw'):.3f} (seeds -9.96 / -10.16) | {m.lp('raw') / 2:.3f} | 0.0% (2 s.e. 3.5) |" in text
    assert "| 10 rewrites x 1 epoch | 140 | 73 |" in text  # 10 documents per person
    assert "| birth_city | 0% | 50% | 100% |" in text  # exact match by attribute: the first half of the facts are birth cities
    assert m.n_test == 8 and len(m.facts) == PEOPLE * len(ATTRS)
    assert m.lp_diff("rw10", "raw") == pytest.approx(((-6 + 10) + (-6.1 + 10.2)) / 2)
    d, se = m.paired("rw1", "raw")
    assert d == pytest.approx(2.0) and se == pytest.approx(0.0, abs=1e-9)  # the same jitter in both arms: pairing removes it


def test_rephrasing_verdicts_from_fabricated_measurements(tmp_path):
    ctx = quick_context(tmp_path)
    fabricate(ctx, ORDERED)
    m = rephrasing.measure(ctx, 2)

    def probe(**arms):
        """Measurement m with the named arms' per-fact log-probs shifted by a constant (seed 1 moves with seed 0)."""
        new = {k: dict(v) for k, v in m.probe.items()}
        for arm, shift in arms.items():
            for lab in (arm, f"{arm}-s1"):
                if lab in new:
                    new[lab]["logprob"] = new[lab]["logprob"] + shift
        return dataclasses.replace(m, probe=new)

    judge = stats.judge
    assert judge(rephrasing.TABLE1_ORDER, probe(rw1=-2.0)).startswith("partly: 10 rewrites beat raw beyond noise")
    assert judge(rephrasing.TABLE1_ORDER, probe(rw1=-2.0, rw10=-4.1)).startswith("not reproduced: within noise (2 s.e.: ")
    assert judge(rephrasing.TABLE1_ORDER, probe(rw1=-2.0, rw10=-8.0)).startswith("not reproduced: reversed beyond noise")
    # the seed spread is noise: two seeds that disagree by more than the effect make it "within noise"
    shaky = {k: dict(v) for k, v in m.probe.items()}
    shaky["rw10-s1"]["logprob"] = shaky["raw-s1"]["logprob"] - 4.0
    assert judge(rephrasing.TABLE1_ORDER, dataclasses.replace(m, probe=shaky)).startswith("not reproduced: within noise")
    # exact match: binomial noise over 20 facts per seed
    ex = {k: dict(v) for k, v in m.probe.items()}
    for lab in ("rw10", "rw10-s1"):
        ex[lab]["exact"] = ex["raw"]["exact"] + 0.01
    assert judge(rephrasing.DIVERSITY, dataclasses.replace(m, probe=ex)).startswith("not reproduced: all at the floor")
    for lab in ("raw", "raw-s1"):
        ex[lab]["exact"] = ex[lab]["exact"] + 0.5
    for lab in ("rw10", "rw10-s1"):
        ex[lab]["exact"] = ex[lab]["exact"] + 0.5
    assert judge(rephrasing.DIVERSITY, dataclasses.replace(m, probe=ex)).startswith("within noise (2 s.e. = ")
    # the SFT probe: a fine-tune that does not fit its own people makes the row "probe failed", whatever the order
    failed = dataclasses.replace(m, acc_train={"raw": 0.95, "rw1": 0.6, "rw10": 0.95})
    assert judge(rephrasing.SFT_ORDER, failed) == \
        "probe failed: QA-train accuracy 60% < 90% (the fine-tune does not fit its own people)"
    assert judge(rephrasing.SFT_ORDER, dataclasses.replace(m, acc={"raw": 0.0, "rw1": 0.0, "rw10": 1.0})).startswith("partly")
    assert judge(rephrasing.SFT_ORDER, dataclasses.replace(m, acc={"raw": 0.5, "rw1": 0.5, "rw10": 0.55})).startswith(
        "not reproduced: within noise")
    assert judge(rephrasing.SFT_ORDER, dataclasses.replace(m, acc={"raw": 1.0, "rw1": 0.5, "rw10": 0.0})).startswith(
        "not reproduced: reversed")


def test_rephrasing_probe_failed_in_the_report(tmp_path):
    ctx = quick_context(tmp_path)
    fabricate(ctx, ORDERED, sft_train=0.2)
    sec = run_section(rephrasing, ctx)
    assert verdicts(sec)[2] == "probe failed: QA-train accuracy 20% < 90% (the fine-tune does not fit its own people)"
    assert verdicts(sec)[0].startswith("reproduced")  # the base-model probe does not depend on the fine-tune


@pytest.mark.slow
def test_quick_rephrasing_end_to_end(tmp_path):
    """The --quick preset on real micro artifacts: every arm probed, the probe's rows pair across arms.
    (14 k2 steps: 125 s of CPU at load 11 on the 2-core machine, about a minute idle.)"""
    ctx = quick_context(tmp_path, runner=InProcessK2)
    sec = run_section(rephrasing, ctx)
    assert len(sec.summary) == 3 and all(row[3] for row in sec.summary)
    m = rephrasing.measure(ctx, rephrasing.commands(ctx))  # everything up to date now
    assert set(m.probe) == {"raw", "rw1", "rw10", "raw-s1", "rw10-s1"}
    assert len(m.facts) == rephrasing.SIZES["quick"]["world"] * 6
    assert all(np.all(v["logprob"] < 0) for v in m.probe.values())
