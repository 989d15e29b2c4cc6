"""train.qk_clip_check: QK-Clip's invariant measured in the training loop, and which heads were clipped.

After step t's update and clip, the step's own micro-batches go through the model again (no grad); the
max logit found there is logged as max_logit_post_clip. QK-Clip scales a clipped head's logits by
tau / S with S measured before the update, so the recomputed max is tau exactly when the update itself
barely moved the weights, and near tau otherwise.
"""

import dataclasses

import torch

from k2cli.model.transformer import build_model
from k2cli.optim.muon import OptimConfig
from k2cli.optim.schedule import ScheduleConfig
from k2cli.train.loop import TrainConfig, train
from k2cli.train.progress import read_metrics
from test_train_loop import CFG, make_task


def run(tmp_path, name, lr, tau, steps=8, optim="muonclip", **train_kw):
    model = build_model(CFG, seed=0)
    tc = TrainConfig(steps=steps, batch_size=4, micro_batch_size=2, seq_len=16, eval_every=0, checkpoint_every=100,
                     peak_tflops=1.0, **train_kw)
    oc = OptimConfig(name=optim, lr=lr, weight_decay=0.0, qk_clip_tau=tau)
    recipe = {"train": dataclasses.asdict(tc), "optim": dataclasses.asdict(oc)}
    result = train(model, make_task(), oc, ScheduleConfig(warmup_steps=0, decay_fraction=0.0), tc, tmp_path / name, recipe)
    return result.model, read_metrics(tmp_path / name / "metrics.jsonl")


def test_post_clip_max_is_tau_when_the_update_is_negligible(tmp_path):
    # lr 1e-7: the step moves nothing, so the clip alone sets the logits: every clipped head lands on tau
    # and the largest logit recomputed on the same two micro-batches is tau itself
    tau = 0.01  # below the micro model's initial logits: the clip fires at step 1
    _, hist = run(tmp_path, "still", lr=1e-7, tau=tau, steps=3, qk_clip_check=True)
    assert hist[0]["max_logit"] > tau and hist[0]["heads_clipped_total"] > 0
    for r in hist:
        assert abs(r["max_logit_post_clip"] - tau) <= 1e-4 * tau, r


def test_post_clip_max_stays_near_tau_while_the_clip_fires(tmp_path):
    # tau below the micro model's logits, lr 0.005: the clip fires on most steps; the pre-clip max on a fresh
    # batch overshoots tau by up to ~1.7x, the max recomputed after the clip on the same batch stays near tau
    tau = 0.02
    _, hist = run(tmp_path, "clip", lr=0.005, tau=tau, steps=12, qk_clip_check=True)
    assert sum(r["heads_clipped_total"] > 0 for r in hist) >= 4
    assert max(r["max_logit"] for r in hist) > 1.3 * tau
    assert all(r["max_logit_post_clip"] <= 1.15 * tau for r in hist)
    # without the clip, the same measurement sees the logits above tau
    _, free = run(tmp_path, "free", lr=0.005, tau=tau, steps=12, optim="muon", qk_clip_check=True)
    assert max(r["max_logit_post_clip"] for r in free) > 1.3 * tau
    assert "heads_clipped_ids" not in free[0]


def test_clipped_head_ids_match_the_counts(tmp_path):
    _, hist = run(tmp_path, "ids", lr=0.05, tau=0.06, steps=6)
    H = CFG.num_attention_heads
    for r in hist:
        ids = r.get("heads_clipped_ids", [])
        assert len(ids) == r["heads_clipped_total"] and len(set(ids)) == len(ids)
        assert [sum(1 for i in ids if i // H == layer) for layer in range(CFG.num_hidden_layers)] == r["heads_clipped"]


def test_the_check_changes_nothing_it_measures(tmp_path):
    # on or off, the run is bit-identical (the extra forward has no grad and no side effect); off logs nothing new
    off_model, off = run(tmp_path, "off", lr=0.05, tau=0.06, steps=6)
    on_model, on = run(tmp_path, "on", lr=0.05, tau=0.06, steps=6, qk_clip_check=True)
    assert "max_logit_post_clip" not in off[-1] and "max_logit_post_clip" in on[-1]
    for a, b in zip(off, on):
        assert (a["loss"], a["max_logit"], a["heads_clipped"]) == (b["loss"], b["max_logit"], b["heads_clipped"])
    for (n, p), q in zip(off_model.state_dict().items(), on_model.state_dict().values()):
        assert torch.equal(p, q), n
