"""`make reproduce` (reproduce/run.py): the statistics it judges with, and experiment 1 of its
--quick preset end to end on real (micro) artifacts, rendered into REPORT.md with its plots.

The driver normally starts one `k2` process per step; here the same command lines run in-process
through the CLI (`InProcessK2`), which saves the process start-up (torch import) of every step.
The whole --quick preset (all experiments) takes minutes on 2 cores: that is `make reproduce-quick`,
not a unit test.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]


def load_driver():
    spec = importlib.util.spec_from_file_location("reproduce_run", REPO / "reproduce" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_run"] = module
    spec.loader.exec_module(module)
    return module


run = load_driver()


class InProcessK2(run.K2):
    """The driver's runner, invoking the `k2` click group in this process instead of a subprocess."""

    def execute(self, argv, log, env):
        from k2cli.cli import cli

        saved = {k: os.environ.get(k) for k in ("K2_ARTIFACTS", "K2_REUSE")}
        try:
            result = CliRunner().invoke(cli, argv, catch_exceptions=False)
        finally:  # --root and --reuse set these for the process: leave the test's environment as it was
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        log.write(result.output)
        return result.exit_code


# ----------------------------------------------------------------------------- statistics


def test_tokens_to_reach_interpolates_the_first_crossing():
    curve = [(100, 3.0), (200, 2.0), (300, 1.5), (400, 1.2)]
    assert run.tokens_to_reach(curve, 1.75) == pytest.approx(250)
    assert run.tokens_to_reach(curve, 3.5) == 100  # reached at the first point
    assert run.tokens_to_reach(curve, 1.0) is None  # never reached


def test_budget_to_reach_interpolates_in_log_tokens():
    pts = [(400, 1.2), (100, 2.0), (200, 1.6)]  # unsorted on purpose
    t, how = run.budget_to_reach(pts, 1.6)
    assert how == "interpolated" and t == pytest.approx(200)
    t, how = run.budget_to_reach(pts, 1.4)  # halfway between log(200) and log(400)
    assert how == "interpolated" and t == pytest.approx(math.sqrt(200 * 400))
    assert run.budget_to_reach(pts, 2.5) == (100, "below smallest budget")
    assert run.budget_to_reach(pts, 1.0) == (None, "not reached")


def test_differs_uses_twice_the_noise():
    assert run.differs(1.0, 1.3, 0.1) is True
    assert run.differs(1.0, 1.15, 0.1) is False
    assert run.differs(1.0, 2.0, None) is None
    assert run.binom_se(0.5, 100) == pytest.approx(0.05)


def test_presets_cover_every_experiment_knob():
    keys = set(run.PRESETS["cpu"])
    for name, p in run.PRESETS.items():
        assert set(p) == keys, name
        assert (REPO / "recipes" / p["base"]).is_dir(), name


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
