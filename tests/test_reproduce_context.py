"""Experiment 4 of `make reproduce` (context extension: none / linear / YaRN) on fabricated artifacts: the
runner answers "up to date" for every step and the passkey and position-loss metrics it reads back are
written here, with numbers chosen so that each verdict is known in advance."""

from __future__ import annotations

import dataclasses

from reproduce_fixtures import REPO, fake, quick_context, run_section, verdicts

from reproduce import stats
from reproduce.experiments import context


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
