"""Experiment 1 (reproduce/experiments/optimizers.py): MuonClip vs Muon vs AdamW and QK-Clip.

Fabricated artifacts prove each verdict rule (numbers chosen so every verdict is known), then the --quick
preset runs end to end on real (micro) artifacts through the `k2` CLI in this process, and is make-style
resumable (a second run trains nothing).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from reproduce_fixtures import InProcessK2, fake, quick_context, run_section, verdicts
from reproduce import run, stats
from reproduce.experiments import optimizers

TAU = 5.0  # the quick preset's tau


def clip_history(pre, post, ids, val=2.4):
    """A checked MuonClip run's metrics.jsonl: step t's pre-clip max logit, post-clip max logit, clipped head ids."""
    out = []
    for s, (a, b, i) in enumerate(zip(pre, post, ids), start=1):
        r = {"step": s, "loss": 3.0, "max_logit": a, "max_logit_post_clip": b, "heads_clipped_total": len(i)}
        if i:
            r["heads_clipped_ids"] = i
        if s == len(pre):
            r["val_loss"] = val
        out.append(r)
    return out


def fabricate(ctx):
    from k2cli.model.config import ModelConfig

    val = lambda *vs: [{"step": 4 * (i + 1), "loss": v + 0.1, "val_loss": v} for i, v in enumerate(vs)]  # noqa: E731
    fake(ctx.root, "opt-muonclip-s0", {"final_val_loss": 2.0, "params_total": 1000, "params_active": 500,
                                       "heads_clipped_total": 0}, history=val(2.8, 2.3, 2.0))
    fake(ctx.root, "opt-muon", {"final_val_loss": 1.9}, history=val(2.6, 2.1, 1.9))
    fake(ctx.root, "opt-adamw-lr0.01", {"final_val_loss": 2.2}, history=val(2.9, 2.5, 2.2))
    # Muon's logits reach 48 (tau 5)
    fake(ctx.root, "opt-logit-muon", {"final_val_loss": 2.5},
         history=[{"step": s, "loss": 3.0, "max_logit": 4.0 * s, **({"val_loss": 2.5} if s == 12 else {})} for s in range(1, 13)])
    # lr 0.025: first clip at step 2, then S_t / tau alternates 1.01 / 1.03; lr 0.05: 1.10 / 1.20
    # post-clip max at most 1.04 tau; the model has 4 x 4 = 16 heads
    lo = [4.0, 5.2] + [TAU * (1.01 if s % 2 else 1.03) for s in range(10)]
    hi = [4.5, 5.9] + [TAU * (1.10 if s % 2 else 1.20) for s in range(10)]
    post = [4.2] + [TAU * 1.02] * 10 + [TAU * 1.04]
    every = [[]] + [[0, 5]] * 11
    fake(ctx.root, "opt-logit-muonclip-lr0.025", {"final_val_loss": 2.45}, history=clip_history(lo, post, every),
         files={"model.json": ModelConfig().to_json()})
    fake(ctx.root, "opt-logit-muonclip-lr0.05", {"final_val_loss": 2.4}, history=clip_history(hi, post, every))
    # weight decay 0.1: heads 0, 5, 7 clipped at steps 2-3, quiet from step 4 (the decay starts at step 9 of 12)
    quiet = [4.0, 5.5, 5.2] + [4.0] * 9
    fake(ctx.root, "opt-logit-muonclip-wd0.1", {"final_val_loss": 2.3},
         history=clip_history(quiet, [4.0] * 12, [[], [0, 5], [0, 7]] + [[]] * 9))


def test_optimizers_measures_and_judges_fabricated_runs(tmp_path):
    ctx = quick_context(tmp_path)
    fabricate(ctx)
    sec = run_section(optimizers, ctx)
    assert len(ctx.k2.commands["optimizers"]) == 3 + 3 + 4  # the shared corpus, three equal-budget runs, four logit runs
    assert sum("train.qk_clip_check=true" in c for c in ctx.k2.commands["optimizers"]) == 3  # every MuonClip logit run
    assert verdicts(sec) == ["reproduced: post-clip max <= 1.040 tau on every step",
                             f"reproduced: smaller at smaller lr, beyond noise (2 s.e. of a median <= {sec.summary[1][3][-6:-1]})",
                             "reproduced: quiet before the lr decay (last clip at 25% of training)",
                             "reproduced (clip better; one seed)", "reproduced", "Muon family better than AdamW"]
    assert "Muon 48 (lr 0.05)" in sec.summary[0][2]
    assert "lr 0.025: 1.020 / 1.030; lr 0.05: 1.150 / 1.200" in sec.summary[1][2]
    assert "last clip at step 3 of 12 (decay from 9); 19% of heads ever clipped" in sec.summary[2][2]  # 3 of 16
    assert sec.summary[4][2] == f"{6144 / (2048 + 2048 * 0.4 / 0.5):.2f}x (curve)"  # crosses 2.2 between 2.6 and 2.1
    assert "| MuonClip, lr 0.05, wd 0.1 | 0.05 | 0.1 | 2.3000 | 5.5 | 2 / 3 | 2 of 12 | 0.800 / 0.932 | 0.800 | 3 of 16 (19%) |" \
        in sec.body

    # the same measurement under other numbers: each rule list's other verdicts
    m = optimizers.measure(ctx, optimizers.commands(ctx))
    assert m.n_heads == 16 and m.decay_start == 9 and m.noise is None
    assert m.t_curve == pytest.approx(2048 + 2048 * 0.8)
    judge = lambda rules, **kw: stats.judge(rules, dataclasses.replace(m, **kw))  # noqa: E731
    assert judge(optimizers.QK_CAP, tau=60.0) == "not reproduced: logits did not grow past tau"

    def clip(label, **kw):  # m.clip with one run changed
        return {**m.clip, label: dataclasses.replace(m.clip[label], **kw)}

    hist = m.clip["lr 0.05"].hist
    over = [dict(r, max_logit_post_clip=TAU * 1.3) for r in hist]
    assert judge(optimizers.QK_CAP, clip=clip("lr 0.05", hist=over)) == "not reproduced: post-clip max 1.300 tau"
    unchecked = [{k: v for k, v in r.items() if k != "max_logit_post_clip"} for r in hist]
    assert judge(optimizers.QK_CAP, clip=clip("lr 0.05", hist=unchecked)) == "not measured: no post-clip check"
    # the overshoot: reversed with lr; equal at both lrs; one lr that never clipped
    low = m.clip["lr 0.025"].hist
    assert judge(optimizers.OVERSHOOT_SHRINKS, clip=clip("lr 0.025", hist=hist)) == \
        "not reproduced: the median overshoot does not fall with lr"
    noisy = [dict(r, max_logit=r["max_logit"] * (1.5 if r["step"] % 4 == 0 else 1.0)) for r in low]
    assert judge(optimizers.OVERSHOOT_SHRINKS, clip=clip("lr 0.025", hist=noisy)).startswith("partly: smaller at smaller lr")
    never = [dict(r, heads_clipped_total=0, heads_clipped_ids=[]) for r in low]
    assert judge(optimizers.OVERSHOOT_SHRINKS, clip=clip("lr 0.025", hist=never)) == \
        "not measured: the clip fired at fewer than two lrs"
    # the clip going quiet: only in the decay phase; still clipping at the end; never
    q = m.clip["lr 0.05, wd 0.1"].hist
    at = lambda s: [dict(r, heads_clipped_total=1) if r["step"] == s else r for r in q]  # noqa: E731
    assert judge(optimizers.CLIP_GOES_QUIET, clip=clip("lr 0.05, wd 0.1", hist=at(10))) == \
        "partly: quiet only in the lr decay phase (last clip at 83% of training)"
    assert judge(optimizers.CLIP_GOES_QUIET, clip=clip("lr 0.05, wd 0.1", hist=at(12))) == \
        "not reproduced: still clipping in the last 10% of steps"
    assert judge(optimizers.CLIP_GOES_QUIET, clip=clip("lr 0.05, wd 0.1", hist=[dict(r, heads_clipped_total=0) for r in q])) == \
        "not run: clip never fired"
    noisy_m = dataclasses.replace(m, noise=0.01)
    assert stats.judge(optimizers.CLIP_HARMLESS, noisy_m) == "reproduced (clip better)"
    assert stats.judge(optimizers.CLIP_HARMLESS, dataclasses.replace(noisy_m, muon_final=2.405)) == "reproduced (within noise)"
    assert judge(optimizers.CLIP_HARMLESS, muon_final=2.3) == "unclear: clip worse by 0.1000, no noise estimate"
    assert judge(optimizers.TOKEN_EFFICIENCY, t_curve=5000) == f"partly: Muon ahead, by less than 2x ({6144 / 5000:.2f}x)"
    assert judge(optimizers.TOKEN_EFFICIENCY, noise=0.2).startswith("within noise: 1.67x")
    assert judge(optimizers.LOSS_ORDER, adam_loss=1.5) == "not reproduced: AdamW better"


def test_quick_optimizers_end_to_end_and_resumable(tmp_path, capsys):
    root, report = tmp_path / "root", tmp_path / "report"
    argv = ["--quick", "--only", "1", "--root", str(root), "--report-dir", str(report)]
    assert run.main(argv, runner=InProcessK2) == 0

    text = (report / "REPORT.md").read_text()
    assert "| 1 | Muon's attention logits grow" in text and "| 1 | QK-Clip is reactive" in text
    assert "Moonlight" in text and "**failed**" not in text and "| failed |" not in text
    for png in ("opt_val_loss.png", "opt_qk_clip.png"):
        assert (report / png).stat().st_size > 1000, png
        assert f"]({png})" in text
    # the exact commands are in the report, and only the public CLI was used
    assert "k2 --root $ROOT --reuse pretrain --recipe recipes/micro/pretrain.toml" in text
    assert "--set train.qk_clip_check=true" in text
    assert "not run in this invocation" in text  # experiments 2-5 were left out with --only
    # numbers come from the artifacts: every step of a checked run has its post-clip max, and the table quotes it
    hist = [json.loads(x) for x in (root / "opt-logit-muonclip-lr0.05" / "latest" / "metrics.jsonl").read_text().splitlines()]
    assert all("max_logit_post_clip" in r for r in hist)
    assert f"| {max(r['max_logit_post_clip'] for r in hist) / optimizers.SIZES['quick']['logit']['tau']:.3f} |" in text

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
