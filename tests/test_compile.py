"""torch.compile of the training step: one whole graph (fullgraph, zero breaks), the eager numbers.

Compiled with the `aot_eager` backend: dynamo traces the graph and AOTAutograd derives the
backward exactly as under inductor, without inductor's C++ code generation (minutes on a
2-core CPU; `k2 pretrain --preset micro --set train.compile=true` exercises inductor itself).
"""

import functools

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from k2cli.errors import K2Error
from k2cli.model.transformer import build_model
from test_train_loop import CFG, run


def loss_step(model, ids):
    """The loop's forward: logits with every statistic, the loss with the balance term."""
    logits, stats = model(ids[:, :-1], stats=True, max_logits=True)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()) + 1e-4 * stats.balance_loss
    return loss, stats.max_logits, stats.expert_counts


def grads(model, step, ids):
    model.zero_grad(set_to_none=True)
    loss, max_logits, counts = step(model, ids)
    loss.backward()
    return loss.detach(), max_logits, counts, [p.grad.clone() for p in model.parameters()]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_training_step_is_one_graph_with_eager_numbers():
    model = build_model(CFG, seed=0)
    ids = torch.randint(0, CFG.vocab_size, (2, 81), generator=torch.Generator().manual_seed(0))  # 80 rows: two attention blocks
    explained = torch._dynamo.explain(loss_step)(model, ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    torch._dynamo.reset()
    eager = grads(model, loss_step, ids)
    compiled = grads(model, torch.compile(loss_step, fullgraph=True, backend="aot_eager"), ids)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)  # loss
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-6)  # per-head max logits
    assert torch.equal(compiled[2], eager[2])  # expert counts
    for a, b in zip(compiled[3], eager[3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_training_loop_with_compile_matches_eager(tmp_path, monkeypatch):
    eager = [r["loss"] for r in run(tmp_path, 3, name="eager").history]
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = [r["loss"] for r in run(tmp_path, 3, name="compiled", compile=True).history]
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_a_compile_failure_is_a_clean_error(tmp_path, monkeypatch):
    from k2cli.model import transformer

    forward = transformer.K2Model.forward

    def broken(self, *args, **kw):
        torch._dynamo.graph_break()  # what an untraceable op does: with fullgraph, an error
        return forward(self, *args, **kw)

    monkeypatch.setattr(transformer.K2Model, "forward", broken)
    with pytest.raises(K2Error, match="torch.compile failed") as e:
        run(tmp_path, 2, compile=True)
    assert "train.compile=false" in e.value.hint


def test_post_clip_check_under_compile_matches_eager(tmp_path, monkeypatch):
    """train.qk_clip_check runs the compiled model a second time per step (no grad, after the clip): with
    fullgraph that must not break, and it must measure what eager measures."""
    def post(name, **kw):
        return [r["max_logit_post_clip"] for r in run(tmp_path, 3, name=name, qk_clip_check=True, **kw).history
                if "max_logit_post_clip" in r]

    eager = post("eager")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = post("compiled", compile=True)
    assert len(eager) == 3 and compiled == pytest.approx(eager, rel=1e-4)
