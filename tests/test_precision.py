"""bf16 on CPU: the same mixed-dtype code paths a GPU runs (model/precision.py), so CI exercises them.

The micro chain's training stages with train.precision=bf16, the model against float32, and
generation / serving in bf16.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_clean_error
from k2cli.errors import K2Error
from k2cli.model import attention as attention_mod
from k2cli.model.config import ModelConfig
from k2cli.model.generate import generate
from k2cli.model.precision import compute_dtype, resolve_precision
from k2cli.model.transformer import build_model
from k2cli.serve.engine import Engine

BF16 = ("--set", "train.precision=bf16")


def micro_model():
    return build_model(ModelConfig.from_preset("micro"), seed=0)


def step(model, ids):
    logits, stats = model(ids[:, :-1], stats=True, max_logits=True)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()) + 1e-4 * stats.balance_loss
    loss.backward()
    return logits, loss, stats


@pytest.mark.parametrize("backend", ["blocked", "sdpa"])  # CPU's kernel, and the one CUDA uses
def test_bf16_forward_backward_close_to_fp32_and_weights_stay_fp32(monkeypatch, backend):
    monkeypatch.setattr(attention_mod, "ATTENTION_BACKEND", backend)
    model = micro_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 97), generator=torch.Generator().manual_seed(0))
    logits32, loss32, stats32 = step(model, ids)
    grads32 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with compute_dtype(model, torch.bfloat16):
        logits16, loss16, stats16 = step(model, ids)
    assert logits16.dtype == torch.bfloat16 and model.compute_dtype is None  # restored after the block
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert stats16.max_logits.dtype == torch.float32 and stats16.balance_loss.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 0.02 * loss32.item()
    torch.testing.assert_close(stats16.max_logits, stats32.max_logits, rtol=0.05, atol=0.02)
    for g16, g32 in zip((p.grad for p in model.parameters()), grads32):
        assert F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.95


def test_bf16_generation_and_engine_on_cpu():
    model = micro_model().eval()
    prompts = [[1, 2, 3, 4], [5, 6]]  # left-padded: the masked attention path too
    out = generate(model, prompts, max_new_tokens=5, precision="bf16")
    assert [len(r) for r in out] == [5, 5] and model.compute_dtype is None
    assert out == generate(model, prompts, max_new_tokens=5, precision="bf16")  # deterministic
    engine = Engine(model, max_batch=2, precision="bf16")
    assert model.compute_dtype == torch.bfloat16
    from k2cli.serve.engine import BatchCache

    cache = BatchCache.empty(model, 1, 8, torch.zeros(1, dtype=torch.long))
    assert cache.latent.dtype == torch.bfloat16 and engine.device.type == "cpu"


def test_precision_policy_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == torch.float32 and resolve_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(K2Error, match="unknown precision"):
        resolve_precision("fp8", cpu)


def test_bad_precision_or_device_is_a_clean_error(monkeypatch, k2):
    from k2cli.model import precision

    k2("data", "synth", "--preset", "micro")
    short = ("pretrain", "synth:latest", "--preset", "micro", "--set", "train.steps=1")
    if not torch.cuda.is_available():
        assert_clean_error(k2(*short, "--set", "train.device=cuda", ok=False), "no CUDA device", "train.device=cpu")
    monkeypatch.setattr(precision, "bf16_supported", lambda device: False)  # a device without bf16
    assert_clean_error(k2(*short, *BF16, ok=False), "no bfloat16 support", "train.precision=fp32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_serving_on_a_missing_gpu_is_a_clean_error(k2):
    from helpers import PEOPLE, model_artifact

    model = model_artifact([f"{n} lives in {c}." for n, c, _ in PEOPLE] * 5)
    for command in ("chat", "serve"):
        assert_clean_error(k2(command, model.path, "--device", "cuda", ok=False), "no CUDA device", "--device cpu")


def test_micro_chain_trains_in_bf16(k2):
    """pretrain -> extend-context -> sft -> rl, each a few steps in bf16 on CPU."""
    from k2cli.artifacts import open_artifact

    k2("data", "synth", "--preset", "micro")
    k2("pretrain", "synth:latest", "--preset", "micro", *BF16, "--set", "train.steps=2")
    k2("extend-context", "pretrain:latest", "--preset", "micro", *BF16, "--set", "train.steps=2", "--set", "eval.suites=[]")
    k2("agentic", "synth:latest", "--preset", "micro")
    k2("sft", "extend-context:latest", "--preset", "micro", *BF16, "--set", "train.steps=2")
    k2("rl", "sft:latest", "--preset", "micro", *BF16, "--set", "train.steps=1")
    for stage in ("pretrain", "extend-context", "sft", "rl"):
        art = open_artifact(f"{stage}:latest", kind="model")
        assert art.recipe["train"]["precision"] == "bf16"
        from k2cli.train.progress import read_metrics

        rows = read_metrics(art.file("metrics.jsonl"))
        assert rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows), stage


def test_a_serving_model_stores_its_matrices_in_the_compute_dtype_once():
    """k2 serve / chat keep a generate-only model in bf16 (no float32 -> bf16 cast of every weight on every
    decoded token); the router's weights and bias and the norms stay float32, and it generates as the
    float32-weight model does under the same bf16 compute dtype."""
    from k2cli.model.moe import Router
    from k2cli.model.precision import store_for_inference

    model = micro_model().eval()
    prompts = [[1, 2, 3, 4], [5, 6]]
    expected = generate(model, prompts, max_new_tokens=5, precision="bf16")
    store_for_inference(model, torch.bfloat16)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert routers and all(r.weight.dtype == torch.float32 and r.e_score_correction_bias.dtype == torch.float32 for r in routers)
    assert model.embed_tokens.weight.dtype == torch.bfloat16 and model.norm.weight.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if p.dim() >= 2 and ".gate.weight" not in n)
    assert generate(model, prompts, max_new_tokens=5, precision="bf16") == expected
    kept = store_for_inference(micro_model(), torch.float32)  # float32 (and None): nothing to do
    assert all(p.dtype == torch.float32 for p in kept.parameters())
