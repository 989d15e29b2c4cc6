"""The Triton flash-attention kernel against the reference, on CPU under Triton's interpreter.

TRITON_INTERPRET=1 must be set before the kernels are defined (triton_kernels.py, imported on the
first call), so this file sets it at collection time, before any test runs — on machines without
CUDA only: on a GPU the same comparisons run compiled (tests/test_gpu.py), and this file skips.
The shapes are tiny: the interpreter runs each block as numpy arrays.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from k2cli.model import attention  # noqa: E402
from k2cli.model.blocked_attention import causal_attention  # noqa: E402
from k2cli.model.triton_attention import flash_attention, use_triton  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CUDA machine: tests/test_gpu.py runs the kernel compiled")


def reference(q, k, v, scale):
    """Plain softmax attention in float64: (out, per-head max logit)."""
    T, S = q.shape[2], k.shape[2]
    s = (q.double() @ k.double().mT) * scale
    seen = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]
    s = s.masked_fill(~seen, float("-inf"))
    return torch.softmax(s, -1) @ v.double(), s.amax(dim=(0, 2, 3))


def inputs(B, H, T, S, d, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, w, generator=g) for n, w in ((T, d), (S, d), (S, dv)))
    q = q * 2  # logits of a few units: the statistic is not a tie of near-zero values
    return [x.to(dtype).requires_grad_(True) for x in (q, k, v)]


# (B, H, T, S, d, dv): MLA-like widths that are not powers of two (48 = 32 + 16, the tiny preset;
# 24 = 16 + 8), dv != d, dv below tl.dot's 16, T not a multiple of the 16-row blocks, and a chunk
# after a cache (S > T: query t sees keys 0 .. S - T + t).
SHAPES = [(2, 3, 37, 37, 48, 32), (1, 2, 20, 20, 24, 8), (1, 2, 13, 29, 16, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference_fp32(shape):
    B, H, T, S, d, dv = shape
    scale = d**-0.5
    q, k, v = inputs(*shape, torch.float32)
    out, head_max = flash_attention(q, k, v, scale)
    ref_out, ref_max = reference(q, k, v, scale)
    assert out.shape == (B, H, T, dv) and out.dtype == torch.float32
    assert head_max.shape == (H,) and head_max.dtype == torch.float32 and not head_max.requires_grad
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(head_max.double(), ref_max, atol=1e-5, rtol=1e-5)

    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v), g)
    qd, kd, vd = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref_grads = torch.autograd.grad(reference(qd, kd, vd, scale)[0], (qd, kd, vd), g.double())
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=1e-4, msg=f"d{name}")


def test_same_contract_as_blocked_attention():
    """Drop-in for causal_attention: same outputs, statistic and gradients (fp32)."""
    q, k, v = inputs(2, 2, 33, 33, 24, 16, torch.float32, seed=3)
    out, head_max = flash_attention(q, k, v, 0.3)
    q2, k2, v2 = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ref, ref_max = causal_attention(q2, k2, v2, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head_max, ref_max, atol=1e-6, rtol=1e-6)
    (out * out).sum().backward()
    (ref * ref).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_bf16_inputs():
    """bf16 in, bf16 out and bf16 gradients; close to the float64 reference at bf16 precision."""
    q, k, v = inputs(1, 2, 21, 21, 48, 32, torch.bfloat16, seed=5)
    out, head_max = flash_attention(q, k, v, 48**-0.5)
    ref_out, ref_max = reference(q, k, v, 48**-0.5)
    assert out.dtype == torch.bfloat16 and head_max.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(head_max.double(), ref_max, atol=1e-4, rtol=1e-4)  # exact products of bf16 inputs
    out.float().sum().backward()
    qd, kd, vd = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    reference(qd, kd, vd, 48**-0.5)[0].sum().backward()
    for x, ref in ((q, qd), (k, kd), (v, vd)):
        assert x.grad.dtype == torch.bfloat16
        # bf16's relative precision against the gradient's scale (D = rowsum(dO * O) uses the bf16
        # output, as in FlashAttention-2, so entries that should cancel to 0 come out at ~1e-2)
        assert (x.grad.double() - ref.grad).abs().max() <= 2e-2 * ref.grad.abs().max()


def test_dispatch(monkeypatch):
    cpu = torch.zeros(1, 1, 2, 16)
    assert not use_triton(cpu)  # auto: CUDA only
    monkeypatch.setattr(attention, "ATTENTION_BACKEND", "triton")
    assert use_triton(cpu)
    monkeypatch.setattr(attention, "ATTENTION_BACKEND", "sdpa")
    assert not use_triton(cpu)


def test_micro_model_through_the_kernel(monkeypatch):
    """The whole micro model (MLA d = 16, dv = 8) with the kernel in place of the blocked path:
    same loss, statistic and gradients."""
    from k2cli.model.config import ModelConfig
    from k2cli.model.transformer import build_model

    model = build_model(ModelConfig.from_preset("micro"), seed=0)
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))

    def run(backend):
        monkeypatch.setattr(attention, "ATTENTION_BACKEND", backend)
        model.zero_grad(set_to_none=True)
        logits, stats = model(x, stats=True, max_logits=True)
        loss = logits.float().square().mean()
        loss.backward()
        return loss.detach(), stats.max_logits, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss_t, ml_t, g_t = run("triton")
    loss_b, ml_b, g_b = run("blocked")
    torch.testing.assert_close(loss_t, loss_b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ml_t, ml_b, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_t, g_b):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_autocast_takes_its_dtype():
    """Under autocast (the training loop's bf16 path) fp32 inputs run in autocast's dtype, like sdpa."""
    q, k, v = inputs(1, 2, 17, 17, 24, 16, torch.float32, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, head_max = flash_attention(q, k, v, 0.25)
    assert out.dtype == torch.bfloat16 and head_max.dtype == torch.float32
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32  # gradients in the inputs' own dtype
    ref, ref_max = reference(*(x.to(torch.bfloat16) for x in (q, k, v)), 0.25)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(head_max.double(), ref_max, atol=1e-4, rtol=1e-4)


def test_split_width():
    """q/k columns in two power-of-two chunks: K2's 192 is 128 + 64, not padded to 256."""
    from k2cli.model.triton_attention import split_width

    assert [split_width(d) for d in (192, 96, 48, 128, 24, 8)] == [(128, 64), (64, 32), (32, 16), (128, 0), (16, 16), (16, 0)]


def test_compiles_fullgraph_as_an_opaque_op():
    """torch.compile(fullgraph=True) traces through flash_attention (two custom ops): no graph break,
    same output, statistic and gradients as eager."""
    q, k, v = inputs(1, 2, 19, 19, 24, 16, torch.float32, seed=9)

    def f(q, k, v):
        out, head_max = flash_attention(q, k, v, 0.2)
        return (out * out).sum(), head_max

    torch._dynamo.reset()
    loss_c, max_c = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    grads_c = torch.autograd.grad(loss_c, (q, k, v))
    loss_e, max_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(max_c, max_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)
