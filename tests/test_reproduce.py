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


# ----------------------------------------------------------------------------- the driver, real artifacts


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
