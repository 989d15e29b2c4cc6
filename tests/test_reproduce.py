"""`make reproduce` (reproduce/): the statistics and verdict rules it judges with, every experiment module
on fabricated artifacts (commands recorded, numbers read back, plots, report text, verdicts), and experiment 1
of its --quick preset end to end on real (micro) artifacts, rendered into REPORT.md with its plots.

The driver normally starts one `k2` process per step; here the same command lines run in-process
through the CLI (`InProcessK2`), which saves the process start-up (torch import) of every step, or
not at all (`Recorder`: every step "up to date", over artifacts the test wrote).
The whole --quick preset (all experiments) takes minutes on 2 cores: that is `make reproduce-quick`,
not a unit test.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the `reproduce` package sits at the top of the repository

from reproduce import common, run, stats  # noqa: E402
from reproduce_fixtures import InProcessK2, Recorder, fake, quick_context, run_section, verdicts  # noqa: E402,F401
from reproduce.experiments import context, optimizers, rephrasing, rl, sparsity  # noqa: E402


# ----------------------------------------------------------------------------- statistics


def test_tokens_to_reach_interpolates_the_first_crossing():
    curve = [(100, 3.0), (200, 2.0), (300, 1.5), (400, 1.2)]
    assert stats.tokens_to_reach(curve, 1.75) == pytest.approx(250)
    assert stats.tokens_to_reach(curve, 3.5) == 100  # reached at the first point
    assert stats.tokens_to_reach(curve, 1.0) is None  # never reached


def test_budget_to_reach_interpolates_in_log_tokens():
    pts = [(400, 1.2), (100, 2.0), (200, 1.6)]  # unsorted on purpose
    t, how = stats.budget_to_reach(pts, 1.6)
    assert how == "interpolated" and t == pytest.approx(200)
    t, how = stats.budget_to_reach(pts, 1.4)  # halfway between log(200) and log(400)
    assert how == "interpolated" and t == pytest.approx(math.sqrt(200 * 400))
    assert stats.budget_to_reach(pts, 2.5) == (100, "below smallest budget")
    assert stats.budget_to_reach(pts, 1.0) == (None, "not reached")


def test_differs_uses_twice_the_noise():
    assert stats.differs(1.0, 1.3, 0.1) is True
    assert stats.differs(1.0, 1.15, 0.1) is False
    assert stats.differs(1.0, 2.0, None) is None
    assert stats.binom_se(0.5, 100) == pytest.approx(0.05)


def test_presets_cover_every_experiment_knob():
    keys = set(common.PRESETS["cpu"])
    for name, p in common.PRESETS.items():
        assert set(p) == keys, name
        assert (REPO / "recipes" / p["base"]).is_dir(), name
    for _, exp in run.EXPERIMENTS:  # each experiment sizes itself for every preset, with the same knobs
        assert set(exp.SIZES) == set(common.PRESETS), exp.KEY
        knobs = {name: set(s) if isinstance(s, dict) else None for name, s in exp.SIZES.items()}
        assert len({repr(sorted(k)) if k else None for k in knobs.values()}) == 1, (exp.KEY, knobs)


def test_reuse_is_detected_from_the_stage_layers_words():
    assert common.was_up_to_date("resolving...\nup to date: pretrain/v3 (same recipe and inputs)\n")
    assert not common.was_up_to_date("step 12/12 loss 2.1\nwrote pretrain/v4\n")


def test_judge_takes_the_first_rule_that_holds_and_quotes_the_measurement():
    rules = [stats.Rule("none", lambda c: c.a is None), stats.Rule("big: {a:.1f} > {twice_noise:.2f}", lambda c: c.a > 1),
             stats.Rule("small")]
    assert stats.judge(rules, stats.Comparison(None, 0.0, 0.1)) == "none"
    assert stats.judge(rules, stats.Comparison(2.0, 0.0, 0.1)) == "big: 2.0 > 0.20"  # a property is a field too
    assert stats.judge(rules, stats.Comparison(0.5, 0.0, 0.1)) == "small"
    with pytest.raises(ValueError):
        stats.judge(rules[:1], stats.Comparison(1.0, 0.0, 0.1))  # no rule held and no fallback
    beats = lambda a, b, noise: stats.judge(stats.BEATS, stats.Comparison(a, b, noise))  # noqa: E731
    assert beats(0.9, 0.6, 0.05) == "reproduced"
    assert beats(0.6, 0.9, 0.05) == "not reproduced (reversed beyond noise)"
    assert beats(0.62, 0.6, 0.05) == "within noise (2 s.e. = 0.100)"
    assert beats(0.62, 0.6, None) == "reproduced" and beats(None, 0.6, 0.05) == "not measured"


# ----------------------------------------------------------------------------- every experiment, fabricated artifacts
#
# Each experiment module runs whole (commands, measure, plots, section, summary) against a runner that runs
# nothing: every step answers "up to date", and the artifacts the experiment reads back are written here,
# with numbers chosen so that each verdict is known in advance.


def test_optimizers_measures_and_judges_fabricated_runs(tmp_path):
    from k2cli.model.config import ModelConfig

    ctx = quick_context(tmp_path)
    tps = 4 * 128  # the quick preset's batch x seq
    val = lambda *vs: [{"step": 4 * (i + 1), "loss": v + 0.1, "val_loss": v} for i, v in enumerate(vs)]  # noqa: E731
    fake(ctx.root, "opt-muonclip-s0", {"final_val_loss": 2.0, "params_total": 1000, "params_active": 500,
                                       "heads_clipped_total": 0}, history=val(2.8, 2.3, 2.0))
    fake(ctx.root, "opt-muon", {"final_val_loss": 1.9}, history=val(2.6, 2.1, 1.9))
    fake(ctx.root, "opt-adamw-lr0.01", {"final_val_loss": 2.2}, history=val(2.9, 2.5, 2.2))
    # at the high lr: Muon's logits reach 50; the clip holds them near tau = 5 and stops firing after step 3
    fake(ctx.root, "opt-logit-muon", {"final_val_loss": 2.5},
         history=[{"step": s, "loss": 3.0, "max_logit": 4.0 * s, **({"val_loss": 2.5} if s == 12 else {})} for s in range(1, 13)])
    fake(ctx.root, "opt-logit-muonclip", {"final_val_loss": 2.4},
         history=[{"step": s, "loss": 3.0, "max_logit": 5.3 if s <= 3 else 4.0, "heads_clipped_total": 2 if s <= 3 else 0}
                  for s in range(1, 13)], files={"model.json": ModelConfig().to_json()})
    sec = run_section(optimizers, ctx)
    assert len(ctx.k2.commands["optimizers"]) == 3 + 5  # the shared corpus, then five pretraining runs
    assert verdicts(sec) == ["reproduced", "reproduced", "reproduced (clip better; one seed)", "reproduced",
                             "Muon family better than AdamW"]
    assert "Muon 48 vs MuonClip 5.3" in sec.summary[0][2]
    assert sec.summary[3][2] == f"{6144 / (2048 + 2048 * 0.4 / 0.5):.2f}x (curve)"  # crosses 2.2 between 2.6 and 2.1
    assert "| MuonClip | 5.3 | 2.4000 | 3 of 12 | 3 |" in sec.body

    # the same measurement under other numbers: each rule list's other verdicts
    m = optimizers.measure(ctx, optimizers.Runs({"MuonClip (seed 0)": "opt-muonclip-s0", "Muon": "opt-muon",
                                                 "AdamW lr 0.01": "opt-adamw-lr0.01"}, {},
                                                {"muon": "opt-logit-muon", "muonclip": "opt-logit-muonclip"}))
    assert m.n_heads == 4 * 4 and m.t_curve == pytest.approx(2048 + 2048 * 0.8) and m.noise is None
    assert stats.judge(optimizers.QK_CAP, dataclasses.replace(m, tau=60.0)) == "not reproduced: logits did not grow past tau"
    assert stats.judge(optimizers.QK_CAP, dataclasses.replace(m, tau=4.0)) == "not reproduced: not capped"
    assert stats.judge(optimizers.CLIP_GOES_QUIET, dataclasses.replace(m, logit_steps=4)) == \
        "not reproduced: still clipping in the last 30% of steps"
    noisy = dataclasses.replace(m, noise=0.01)
    assert stats.judge(optimizers.CLIP_HARMLESS, noisy) == "reproduced (clip better)"
    assert stats.judge(optimizers.CLIP_HARMLESS, dataclasses.replace(noisy, grow_final={"muon": 2.4, "muonclip": 2.405})) == \
        "reproduced (within noise)"
    assert stats.judge(optimizers.CLIP_HARMLESS, dataclasses.replace(m, grow_final={"muon": 2.4, "muonclip": 2.5})) == \
        "unclear: clip worse by 0.1000, no noise estimate"
    assert stats.judge(optimizers.TOKEN_EFFICIENCY, dataclasses.replace(m, t_curve=5000)) == \
        f"partly: Muon ahead, by less than 2x ({6144 / 5000:.2f}x)"
    assert stats.judge(optimizers.TOKEN_EFFICIENCY, dataclasses.replace(m, noise=0.2)).startswith("within noise: 1.67x")
    assert stats.judge(optimizers.LOSS_ORDER, dataclasses.replace(m, adam_loss=1.5)) == "not reproduced: AdamW better"


def test_rephrasing_reads_corpora_and_eval_results(tmp_path):
    import datasets
    from tokenizers import Tokenizer, models, pre_tokenizers

    ctx = quick_context(tmp_path)
    words = ["Anna", "Berg", "was", "born", "in", "Oslo", "works", "at", "Acme"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fake(ctx.root, "kn-tokenizer", kind="tokenizer", files={"tokenizer.json": tok.to_str()})
    for name, docs in {"kn-synth": 2, "kn-rw1": 2, "kn-rw10": 20}.items():
        fake(ctx.root, name, {"qa_test": 10}, kind="dataset")
        datasets.Dataset.from_dict({"text": ["Anna Berg was born in Oslo"] * docs, "doc_id": [str(i) for i in range(docs)]}
                                   ).save_to_disk(str(ctx.root / name / "v1" / "corpus"))
    acc = {"raw": 0.0, "rw1": 0.5, "rw10": 1.0}  # 8 questions each: every step beyond twice its standard error
    for name, scale in (("kn-eval-sft", 1.0), ("kn-eval-base", 0.5)):
        models_ = [{"label": k, "suites": {"knowledge": {"metrics": {
            "accuracy": scale * a, "accuracy_qa_train_people": 0.9, "accuracy_birth_city": a}}}} for k, a in acc.items()]
        fake(ctx.root, name, kind="eval", files={"results.json": json.dumps({"models": models_})})
    sec = run_section(rephrasing, ctx)
    assert verdicts(sec) == ["reproduced", "reproduced (direction)"]
    assert "--set train.steps=2 " in ctx.k2.commands["rephrasing"][4]  # 20 x 7 tokens of the 10-rewrite corpus: 1 row
    assert "| raw x 10 epochs | 14 | 73.1 | 0.0% |" in "\n".join(sec.body)  # 2 documents x (6 words + end-of-text)
    assert "| birth_city | 0% | 50% | 100% |" in sec.body
    m = rephrasing.measure(ctx, 2)
    assert m.n_test == 8  # the eval's cap, below the 10 held-out questions
    assert stats.judge(rephrasing.TABLE1_ORDER, dataclasses.replace(m, acc={"raw": 0.0, "rw1": 0.0, "rw10": 1.0})) == \
        "partly: 10 rewrites beat raw beyond noise; the middle step is within noise or reversed"
    assert stats.judge(rephrasing.TABLE1_ORDER, dataclasses.replace(m, acc={"raw": 0.0, "rw1": 0.01, "rw10": 0.01})) == \
        "not reproduced: all at the floor at this scale"
    assert stats.judge(rephrasing.TABLE1_ORDER, dataclasses.replace(m, acc={"raw": 1.0, "rw1": 0.5, "rw10": 0.0})) == \
        "not reproduced: reversed"
    assert stats.judge(rephrasing.DIVERSITY, dataclasses.replace(m, acc={"raw": 0.5, "rw1": 0.5, "rw10": 0.6})) == "within noise"


def test_context_reads_passkey_metrics_of_each_method(tmp_path):
    ctx = quick_context(tmp_path)
    fake(ctx.root, "ext-midtrain", {"steps": 7})

    def ext(acc_256, acc_512, last_bin, parent=False):
        m = {"original_context": 256, "final_val_loss": 2.0, "passkey_trials_per_length": 20,
             "passkey_accuracy_256": acc_256, "passkey_accuracy_512": acc_512,
             "passkey_loss_within": 2.0, "passkey_loss_beyond": 2.1, "passkey_loss_last_bin": last_bin}
        if parent:
            m.update(parent_passkey_accuracy_256=0.9, parent_passkey_accuracy_512=0.0, parent_passkey_loss_last_bin=5.0)
        return m

    fake(ctx.root, "ext-none", ext(0.9, 0.0, 4.0))
    fake(ctx.root, "ext-linear", ext(0.8, 0.1, 3.0))
    fake(ctx.root, "ext-yarn", ext(1.0, 0.8, 2.1, parent=True), recipe={"extend": {"beta_fast": 32, "beta_slow": 1}},
         files={"passkey.png": (REPO / "reproduce" / "passkey.png").read_bytes()})
    sec = run_section(context, ctx)
    assert sec.plots == ["passkey.png", "passkey_heatmap.png"]
    assert verdicts(sec) == ["reproduced", "reproduced (one run each): YaRN's last-bin loss is +0.100 from its loss within 256"]
    assert "beyond the trained length (512): YaRN 80%, linear 10%, none 0%; within 256: YaRN 100%" == sec.summary[0][2]
    assert "| mid-trained parent, no extension | 90% | 0% | - | - | - | 5.000 |" in sec.body
    m = context.measure(ctx, context.Runs("opt-muonclip-s0", "opt-muonclip-s0", "ext-midtrain",
                                          {k: f"ext-{k}" for k in context.METHODS}, None))
    r = m.retrieval
    assert stats.judge(context.YARN_RETRIEVES, dataclasses.replace(r, yarn=0.2)) == "within noise"
    assert stats.judge(context.YARN_RETRIEVES, dataclasses.replace(r, yarn=0.01, linear=0.02, none=0.0)) == \
        "not reproduced: no method retrieves beyond the trained length at this scale"
    assert stats.judge(context.YARN_RETRIEVES, dataclasses.replace(r, yarn=0.01, linear=0.0, none=0.0, best_any=0.0)) == \
        "not reproduced: no method learned to retrieve from this parent (0% at every length)"
    assert stats.judge(context.YARN_RETRIEVES, dataclasses.replace(r, yarn=None)) == "not measured beyond the training length"


def test_rl_compares_objectives_and_skips_without_k2_rl(tmp_path):
    ctx = quick_context(tmp_path)
    for name, (gain, critic) in {"rl-k15": (0.4, 0.9), "rl-pg": (0.1, 0.5), "rl-k15-nocritic": (0.3, 0.6)}.items():
        fake(ctx.root, name, {"start_heldout_math": 0.2, "end_heldout_math": 0.2 + gain, "critic_accuracy_start": 0.5,
                              "critic_accuracy_end": critic, "critic_heldout_pairs": 100},
             recipe={"rl": {"eval_prompts": 100}},
             history=[{"step": 1, "heldout_math": 0.2 + gain / 2, "critic_accuracy": (0.5 + critic) / 2}])
    sec = run_section(rl, ctx)
    assert verdicts(sec) == ["reproduced", "reproduced"]
    assert sec.summary[0][2] == "mean held-out gain K1.5 0.400 vs PG 0.100 (100 held-out episodes each)"
    assert "| plain policy gradient | 0.200 -> 0.300 | 0.500 -> 0.500 |" in sec.body

    class NoRL(Recorder):
        no_rl = True

    sec = run_section(rl, quick_context(tmp_path / "no-rl", runner=NoRL))
    assert sec.status == "skipped" and verdicts(sec) == ["not run: k2 rl not available"]


# ----------------------------------------------------------------------------- experiment 1, real artifacts


def test_quick_optimizers_end_to_end_and_resumable(tmp_path, capsys):
    root, report = tmp_path / "root", tmp_path / "report"
    argv = ["--quick", "--only", "1", "--root", str(root), "--report-dir", str(report)]
    assert run.main(argv, runner=InProcessK2) == 0

    text = (report / "REPORT.md").read_text()
    assert "## Summary" in text
    assert "| 1 | Muon's attention logits grow" in text
    assert "Moonlight" in text and "failed" not in text
    for png in ("opt_val_loss.png", "opt_qk_clip.png"):
        assert (report / png).stat().st_size > 1000, png
        assert f"]({png})" in text
    # the exact commands are in the report, and only the public CLI was used
    assert "k2 --root $ROOT --reuse pretrain --recipe recipes/micro/pretrain.toml" in text
    assert "not run in this invocation" in text  # experiments 2-5 were left out with --only
    # numbers come from the artifacts: the QK-Clip row quotes the runs' own max logits
    hist = [json.loads(x) for x in (root / "opt-logit-muonclip" / "latest" / "metrics.jsonl").read_text().splitlines()]
    assert f"MuonClip {max(r['max_logit'] for r in hist):.1f}" in text

    ledger = json.loads((root / "ledger.json").read_text())
    assert ledger and all(v["status"] == "ran" for v in ledger.values())

    # a second run is make-style: every step is up to date, nothing is trained again
    versions = sorted(p.name for p in (root / "opt-muon").iterdir() if p.name.startswith("v"))
    capsys.readouterr()
    assert run.main(argv, runner=InProcessK2) == 0
    out = capsys.readouterr().out
    assert "ran in" not in out and out.count("up to date") == len(ledger)
    assert sorted(p.name for p in (root / "opt-muon").iterdir() if p.name.startswith("v")) == versions
    assert "| 1 | Muon's attention logits grow" in (report / "REPORT.md").read_text()


def test_a_failing_step_is_reported_and_the_report_still_renders(tmp_path):
    root, report = tmp_path / "root", tmp_path / "report"

    class Broken(InProcessK2):
        def execute(self, argv, log, env):
            if "pretrain" in argv:
                log.write("error: the corpus is on fire (put it out)\n")
                return 2
            return super().execute(argv, log, env)

    assert run.main(["--quick", "--only", "1", "--root", str(root), "--report-dir", str(report)], runner=Broken) == 1
    text = (report / "REPORT.md").read_text()
    assert "failed (see section)" in text and "the corpus is on fire" in text


# ----------------------------------------------------------------------------- copy_probe.py


def test_copy_probe_measures_answer_losses_and_embedding_cosines(capsys):
    spec = importlib.util.spec_from_file_location("copy_probe", REPO / "reproduce" / "copy_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    import torch

    assert probe.mean_cosine(torch.eye(3)) == pytest.approx(0.0)  # orthogonal rows
    assert probe.mean_cosine(torch.ones(4, 5)) == pytest.approx(1.0)  # parallel rows
    from helpers import model_artifact

    texts = [probe.FACTS + probe.QUESTION + probe.ANSWER, " ".join(probe.NAMES), "0 1 2 3 4 5 6 7 8 9"] * 20
    art = model_artifact(texts)
    assert probe.main([str(art.path)]) == 0
    out = capsys.readouterr().out
    assert "answer tokens (teacher-forced loss, nats): ' Berg'" in out and "greedy answer:" in out
    cos = [float(x.rstrip(",")) for x in out.split("mean cosine: digits ")[1].replace("names ", "").split()]
    assert len(cos) == 2 and all(-1 <= c <= 1 for c in cos)
    assert probe.main(["no-such-model:v1"]) == 2  # a missing artifact: one error line, exit status 2
