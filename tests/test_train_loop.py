"""The shared training loop: exact resume, clean interruption, NaN stop, accumulation, recipe checks."""

import dataclasses
import os
import signal

import numpy as np
import pytest
import torch

from k2cli.data.packing import pack
from k2cli.errors import Interrupted, K2Error
from k2cli.model.config import ModelConfig
from k2cli.model.transformer import build_model
from k2cli.optim.muon import OptimConfig
from k2cli.optim.schedule import ScheduleConfig
from k2cli.train.checkpoint import latest_checkpoint
from k2cli.train.lm_task import LMTask
from k2cli.train.loop import TrainConfig, train
from k2cli.train.progress import read_metrics

CFG = ModelConfig(name="micro", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                  intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=64)


def make_task(seed=0, batch=4):
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 64, size=rng.integers(5, 40))) for _ in range(60)]
    data = pack(docs, eot_id=0, seq_len=16, seed=seed)
    return LMTask(data, pack(docs[:10], 0, 16, 1), batch_size=batch, seed=seed, eval_batches=2)


def run(tmp_path, steps, name="run", task=None, resume="auto", **train_kw):
    model = build_model(CFG, seed=0)
    kw = dict(batch_size=4, seq_len=16, eval_every=3, checkpoint_every=100, peak_tflops=1.0) | train_kw
    tc = TrainConfig(steps=steps, **kw)
    recipe = {"train": dataclasses.asdict(tc), "model": CFG.to_dict(), "optim": {"lr": 1e-2}}
    return train(model, task or make_task(), OptimConfig(lr=1e-2, qk_clip_tau=5.0), ScheduleConfig(warmup_steps=2),
                 tc, tmp_path / name, recipe, resume=resume)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_metrics_record_what_the_issue_lists(tmp_path):
    run(tmp_path, 3)
    rec = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "max_logit", "max_logit_per_layer",
                "heads_clipped", "expert_imbalance", "val_loss"):
        assert key in rec, key
    assert len(rec["max_logit_per_layer"]) == CFG.num_hidden_layers


class SignalAt:
    """A task that sends the process SIGINT while computing the batch of one step."""

    def __init__(self, task, step):
        self.task, self.step = task, step
        self.tokens_per_sequence = task.tokens_per_sequence

    def batch(self, step):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)
        return self.task.batch(step)

    def __getattr__(self, name):
        return getattr(self.task, name)


def test_sigint_then_resume_is_bitwise_identical_to_one_run(tmp_path):
    full = run(tmp_path, 6, "full")
    with pytest.raises(Interrupted, match="after step 3/6"):
        run(tmp_path, 6, "split", task=SignalAt(make_task(), 2))
    assert latest_checkpoint(tmp_path / "split").name == "step-000003"
    resumed = run(tmp_path, 6, "split")
    assert resumed.resumed_from == 3
    a = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert a == b and len(a) == 6
    wa, wb = weights(full.model), weights(resumed.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # router biases included (buffers)


class NanAt(SignalAt):
    def loss(self, model, micro, max_logits):
        loss, extra, stats = self.task.loss(model, micro, max_logits)
        if self.calls == self.step:
            loss = loss * float("nan")
        self.calls += 1
        return loss, extra, stats

    calls = 0


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(K2Error, match="loss became nan at step 4.*step-000002"):
        run(tmp_path, 6, task=NanAt(make_task(), 3), checkpoint_every=2)
    assert latest_checkpoint(tmp_path / "run").name == "step-000002"


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    a = run(tmp_path, 3, "big")
    b = run(tmp_path, 3, "accum", micro_batch_size=1)
    la = [r["loss"] for r in a.history]
    lb = [r["loss"] for r in b.history]
    assert np.allclose(la, lb, rtol=1e-5)


def test_resume_with_another_recipe_says_what_differs(tmp_path):
    run(tmp_path, 2)
    model = build_model(CFG, seed=0)
    tc = TrainConfig(steps=2, batch_size=4, seq_len=16, eval_every=3, checkpoint_every=100, peak_tflops=1.0)
    recipe = {"train": dataclasses.asdict(tc), "model": CFG.to_dict(), "optim": {"lr": 0.5}}
    with pytest.raises(K2Error) as e:
        train(model, make_task(), OptimConfig(lr=0.5), ScheduleConfig(), tc, tmp_path / "run", recipe, resume="yes")
    assert e.value.line().startswith("checkpoint step-000002 was made with a different recipe: optim.lr: 0.01 -> 0.5 (")
