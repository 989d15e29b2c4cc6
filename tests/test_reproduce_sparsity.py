"""Experiment 3 (reproduce/experiments/sparsity.py): sparsity at fixed active parameters, on fabricated artifacts
(commands recorded, numbers read back, plots, report text, every verdict of both rule lists)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from reproduce_fixtures import fake, quick_context, run_section, verdicts

from reproduce.experiments import sparsity
from reproduce.stats import judge


def fabricate(ctx, recall: dict, finals: dict, probe_people=(5, 5)):
    """A corpus (300 documents of 7 tokens), a tokenizer, one pretraining run per arm whose validation loss falls
    linearly from 3.0 to its final value over 4 evaluations, and the knowledge-probe results."""
    import datasets
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["Anna", "Berg", "was", "born", "in", "Oslo"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fake(ctx.root, "sp-tokenizer", kind="tokenizer", files={"tokenizer.json": tok.to_str()})
    fake(ctx.root, "sp-synth", kind="dataset")
    datasets.Dataset.from_dict({"text": ["Anna Berg was born in Oslo"] * 300, "doc_id": [str(i) for i in range(300)]}
                               ).save_to_disk(str(ctx.root / "sp-synth" / "v1" / "corpus"))
    models_ = []
    for (E, s), v in finals.items():
        hist = [{"step": k, "val_loss": 3.0 - (3.0 - v) * k / 4} for k in range(1, 5)]
        fake(ctx.root, sparsity.run_name(E, s), {"final_val_loss": v, "params_total": 1000 * E, "params_active": 500,
                                                 "wall_s": 10}, history=hist)
        r = recall[E, s]
        m = {"train_people": probe_people[0], "test_people": probe_people[1], "train_token_acc": r, "test_token_acc": r,
             "train_exact": r / 2, "test_exact": r / 2}
        models_.append({"label": sparsity.run_name(E, s), "suites": {"knowledge-probe": {"metrics": m}}})
    fake(ctx.root, "sp-eval", kind="eval", files={"results.json": json.dumps({"models": models_})})


@pytest.fixture
def two_seeds(monkeypatch):
    """The quick preset with two seeds at the end points, as the cpu preset has."""
    monkeypatch.setitem(sparsity.SIZES, "quick", dict(sparsity.SIZES["quick"], experts=[4, 8, 16], seeds=[0, 1]))


def test_sparsity_runs_every_arm_one_epoch_and_judges_against_the_seed_pairs(tmp_path, two_seeds):
    ctx = quick_context(tmp_path)
    recall = {(4, 0): 0.50, (4, 1): 0.52, (8, 0): 0.60, (16, 0): 0.70, (16, 1): 0.71}
    finals = {(4, 0): 2.0, (4, 1): 2.1, (8, 0): 1.9, (16, 0): 1.5, (16, 1): 1.5}
    fabricate(ctx, recall, finals)
    sec = run_section(sparsity, ctx)
    cmds = ctx.k2.commands["sparsity"]
    # synth, tokenizer, 5 arms (two seeds at 4 and 16 experts, one at 8), one eval of all of them
    assert [c.split("--out ")[1] for c in cmds] == ["sp-synth", "sp-tokenizer", "sp-e4-s0", "sp-e4-s1", "sp-e8-s0",
                                                    "sp-e16-s0", "sp-e16-s1", "sp-eval"]
    assert "--set bios.per_person=3 --set bios.permute=true --set bios.fullname=true" in cmds[0]
    # one epoch: 300 x 7 tokens, 98% of them for training, 1,024 tokens per step -> 2 steps
    assert all("--set train.steps=2 " in c and "--set model.num_experts_per_tok=2 " in c for c in cmds[2:7])
    assert "--suite knowledge-probe" in cmds[-1] and cmds[-1].count("--label") == 5
    # quick: 3 exposures, so PLM 3.3 gives no capacity: the recall row cannot test the claim
    assert verdicts(sec)[0].startswith("not tested at this scale: 3 exposures per fact")
    # tokens to 2.1 (the worse 4-expert seed): 4 experts at 4 and 3.6 steps, 16 experts at 2.4 steps (both seeds)
    assert verdicts(sec)[1] == "reproduced (1.58x fewer tokens)"
    body = "\n".join(sec.body)
    assert "| 16 | 1 | 16,000 | 500 | 0.710 | 0.355 | 1.5000 | 2,458 | 10 |" in body
    assert "Noise (the larger seed-pair spread at the end points): recall 0.020, tokens to target 410" in body
    assert sec.summary[0][2] == "4: 0.510, 8: 0.600, 16: 0.705 value-token recall"


def test_sparsity_recall_rules_need_capacity_to_bind(tmp_path, two_seeds):
    ctx = quick_context(tmp_path)
    recall = {(4, 0): 0.50, (4, 1): 0.52, (8, 0): 0.60, (16, 0): 0.70, (16, 1): 0.71}
    finals = {(4, 0): 2.0, (4, 1): 2.1, (8, 0): 1.9, (16, 0): 1.5, (16, 1): 1.5}
    fabricate(ctx, recall, finals)
    m = sparsity.measure(ctx, sparsity.Runs(2, {a: sparsity.run_name(*a) for a in sparsity.arms("quick")}))
    rules = sparsity.MORE_EXPERTS_RECALL_MORE
    # 100 exposures: PLM 3.3's 1 bit/param. The 4-expert arm has 4,000 parameters.
    assert judge(rules, dataclasses.replace(m, exposures=100, people=100)) == \
        "not tested at this scale: 3,420 bits of facts fit the fewest-experts model (0.855 bits/param)"
    binds = dataclasses.replace(m, exposures=100, people=1000)  # 34,200 bits > 4,000 x 1 bit
    assert binds.capacity_binds and judge(rules, binds) == "reproduced"  # 0.705 - 0.51 > 2 x 0.02
    flat = [dataclasses.replace(a, recall=0.5 + 0.01 * a.seed + 0.01 * (a.experts == 16)) for a in m.arms]
    assert judge(rules, dataclasses.replace(binds, arms=flat)) == "within noise (2 x seed spread = 0.020)"
    rev = [dataclasses.replace(a, recall=1.0 - a.recall) for a in m.arms]
    assert judge(rules, dataclasses.replace(binds, arms=rev)) == "not reproduced (fewer experts recall more, beyond noise)"
    one = [a for a in binds.arms if a.seed == 0]
    assert judge(rules, dataclasses.replace(binds, arms=one)) == "more recall, no noise estimate (one seed)"


def test_sparsity_tokens_to_target_rules(tmp_path, two_seeds):
    ctx = quick_context(tmp_path)
    recall = {a: 0.5 for a in sparsity.arms("quick")}
    finals = {(4, 0): 2.0, (4, 1): 2.1, (8, 0): 1.9, (16, 0): 2.05, (16, 1): 1.9}
    fabricate(ctx, recall, finals)
    m = sparsity.measure(ctx, sparsity.Runs(2, {a: sparsity.run_name(*a) for a in sparsity.arms("quick")}))
    rules = sparsity.FEWER_TOKENS_TO_TARGET
    # 16 experts: seeds at 3.79 and 3.27 steps vs 4 experts at 3.6 and 4: spread (529 tokens) above half the gain
    assert judge(rules, m) == "within noise (1.08x; 2 x seed spread = 1,058 tokens)"
    never = [dataclasses.replace(a, curve=[(t, v + 1) for t, v in a.curve]) if a.experts == 16 else a for a in m.arms]
    assert judge(rules, dataclasses.replace(m, arms=never)) == \
        "not reproduced: the most-experts arm never reaches the fewest-experts arm's final loss"
    one = [a for a in m.arms if a.seed == 1]  # 4 and 16 experts, one seed each: 4 vs 3.27 steps
    assert judge(rules, dataclasses.replace(m, arms=one)) == "faster (1.22x), no noise estimate (one seed)"
    slow = [dataclasses.replace(a, curve=[(t * (3 if a.experts == 16 else 1), v) for t, v in a.curve]) for a in m.arms]
    assert judge(rules, dataclasses.replace(m, arms=slow)).startswith("not reproduced (0.")


def test_capacity_arithmetic():
    # 54 birth years x 365.25 days, 32 cities, 20 universities, 26 majors, 30 companies, ~1 bit of office city
    assert sparsity.fact_bits_per_person() == pytest.approx(34.2, abs=0.05)
    assert sparsity.arms("cpu") == [(4, 0), (4, 1), (16, 0), (64, 0), (64, 1)]


def test_quick_sparsity_end_to_end(tmp_path):
    """The --quick preset on real (micro) artifacts through the CLI: every arm trains one epoch, the probe scores it."""
    from reproduce import run
    from reproduce_fixtures import InProcessK2

    root, report = tmp_path / "root", tmp_path / "report"
    assert run.main(["--quick", "--only", "3", "--root", str(root), "--report-dir", str(report)], runner=InProcessK2) == 0
    text = (report / "REPORT.md").read_text()
    assert "| 4 | 0 |" in text and "| 8 | 0 |" in text and "value-token recall" in text
    assert "not tested at this scale: 3 exposures per fact" in text  # quick never binds capacity
