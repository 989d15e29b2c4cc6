"""Causal flash attention in Triton, with QK-Clip's max-logit statistic for free (CUDA training).

The same contract as `blocked_attention.causal_attention`:

    flash_attention(q [B, H, T, d], k [B, H, S, d], v [B, H, S, dv], scale)
        -> out [B, H, T, dv] (q's dtype), head_max [H] float32 (no grad)

Query t sits at absolute position S - T + t and sees keys 0 .. S - T + t (S == T: plain causal).
d and dv are any widths (MLA: d = qk_nope + qk_rope = 192, dv = 128 at K2's shape, so values are
narrower than keys — which `F.scaled_dot_product_attention`'s flash kernels do not allow without
padding v). The kernels take q/k in two power-of-two column chunks (192 = 128 + 64, `split_width`)
and v in one; masked loads pad a chunk past the real width with zeros (dv = 8 -> 16).

Why a kernel of our own: the statistic is every head's largest pre-softmax logit, and a fused
kernel computes each row's maximum anyway for a stable softmax, but never shows it. Beside
PyTorch's fused kernel the statistic costs a second pass that recomputes all the scores (issue
19 measured 20% of a `small` training step on an H200). Here the forward's running row maxima
ARE the statistic: each program writes the maximum of its block of rows, [B*H, T/BLOCK_M]
numbers, and one tiny torch reduction turns them into [H].

Forward (FlashAttention-2), one program per (block of BLOCK_M query rows, batch*head):
    for each block of BLOCK_N keys the rows can see (blocks past the diagonal are skipped):
        s = q k^T * scale, -inf where key > query     [BM, BN] fp32
        m' = max(m, rowmax(s)); l = l e^(m - m') + rowsum(e^(s - m')); acc = acc e^(m - m') + e^(s - m') v
    out = acc / l;  lse = m + log l  (saved for the backward);  block max = max over valid rows of m
Backward (FlashAttention-2, recomputing p = e^(s - lse) instead of storing it; D = rowsum(dO * O)):
    per key block:    dV = sum p^T dO;  dK = scale * sum dS^T Q,  dS = p * (dO V^T - D)
    per query block:  dQ = scale * sum dS K
Two kernels for the backward (keys-major for dK/dV, queries-major for dQ): no atomics, so the
result is deterministic. The kernels live in triton_kernels.py; here they become two torch custom ops
(k2::flash_attention_fwd / _bwd) with an autograd rule, opaque to torch.compile.

Matmul inputs are the tensors' dtype (bf16 on the tensor cores, fp32 accumulation; fp32 inputs use
exact "ieee" products, not TF32). Under the Triton interpreter (`TRITON_INTERPRET=1`, CPU tensors,
what the tests run) products are taken in fp32: the interpreter stores bf16 as raw 16-bit integers
and only converts them correctly through explicit casts.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
from torch import Tensor

# Looked up once: no import, no cost per call. K2_TRITON=0 turns the kernel off (PyTorch's fused
# attention and a separate statistic pass instead), e.g. if it fails to build on some GPU.
_AVAILABLE = importlib.util.find_spec("triton") is not None and os.environ.get("K2_TRITON", "1") != "0"


def available() -> bool:
    """Is triton installed (and not turned off by K2_TRITON=0)? Optional: Linux x86-64 wheels only;
    attention.py falls back to sdpa without it."""
    return _AVAILABLE


def use_triton(q: Tensor) -> bool:
    """Should `MLAttention` compute unmasked causal attention with this kernel?

    attention.ATTENTION_BACKEND "auto": on CUDA when triton is installed; "triton": also on CPU
    (under TRITON_INTERPRET=1: the tests' way of running the whole model through the kernel);
    any other backend: never.
    """
    if not _AVAILABLE or not (q.is_cuda or _backend() == "triton"):
        return False
    return _backend() in ("auto", "triton")


def _backend() -> str:
    from k2cli.model import attention  # the switch lives there (attention.py imports this module)

    return attention.ATTENTION_BACKEND


def _pad(n: int) -> int:
    """Block width for a head dim of n: a power of two, at least 16 (tl.dot's smallest tile)."""
    return max(16, 1 << (n - 1).bit_length())


def split_width(d: int) -> tuple[int, int]:
    """q/k width d as two power-of-two column chunks (the second 0 when one covers d):
    192 -> (128, 64), 96 -> (64, 32), 48 -> (32, 16), 128 -> (128, 0), 24 -> (16, 16), 8 -> (16, 0).
    MLA's d = nope + rope is rarely a power of two; padding 192 to 256 would cost a third more
    q.k work and registers, two chunks cost nothing (rope dims are powers of two)."""
    first = max(16, 1 << (d.bit_length() - 1))
    return first, (_pad(d - first) if d > first else 0)


def _config(q: Tensor, d: int, dv: int) -> dict:
    """Tile sizes and the matmul input type. Untuned on a GPU (none was lent to measure them):
    64 x 64 tiles are FlashAttention-2's usual choice for head dims up to 128; wider heads
    (K2's 192 + 128) take 64 x 32 to bound registers and shared memory."""
    import triton.language as tl

    dot = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(q.dtype, tl.float32)
    if q.device.type != "cuda":  # the interpreter: fp32 products (see the module docstring)
        dot = tl.float32
    d1, d2 = split_width(d)
    bdv = _pad(dv)
    wide = d1 + d2 + bdv > 256
    cfg = dict(BLOCK_M=64, BLOCK_N=32 if wide else 64, BLOCK_D1=d1, BLOCK_D2=max(d2, 16), HAS_D2=d2 > 0,
               BLOCK_DV=bdv, DOT=dot, PREC="ieee" if dot == tl.float32 else "tf32")
    if q.device.type == "cuda":
        cfg.update(num_warps=8 if wide else 4, num_stages=2)
    else:  # the interpreter runs a block as numpy arrays: few, small blocks keep the tests fast
        cfg.update(BLOCK_M=16, BLOCK_N=16)
    return cfg


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _strides(x: Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of [B, H, T, width] with unit stride along the width."""
    return x.stride(0), x.stride(1), x.stride(2)


# The kernels are wrapped as two torch custom ops (forward, backward) with shape-only "fake"
# implementations and an autograd rule: torch.compile (fullgraph) sees two opaque ops, never Triton's
# launch machinery, and autograd sees an ordinary differentiable op.


@torch.library.custom_op("k2::flash_attention_fwd", mutates_args=())
def _fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> out [B, H, T, dv] (q's dtype), lse [B*H, T] float32, head_max [H] float32."""
    from k2cli.model.triton_kernels import fwd_kernel

    B, H, T, d = q.shape
    S, dv = k.shape[2], v.shape[-1]
    # contiguous, so that each gradient (allocated contiguous) shares its input's strides in the
    # kernels; MLA's v is a slice of the up-projection (strided): one copy of [B, H, S, dv]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cfg = _config(q, d, dv)
    n_m = _cdiv(T, cfg["BLOCK_M"])
    out = q.new_empty(B, H, T, dv)
    lse = torch.empty(B * H, T, dtype=torch.float32, device=q.device)
    block_max = torch.empty(B * H, n_m, dtype=torch.float32, device=q.device)
    fwd_kernel[(n_m, B * H)](q, k, v, out, lse, block_max, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                             H, T, S, d, dv, n_m, scale, **cfg)
    return out, lse, block_max.view(B, H, n_m).amax(dim=(0, 2))


@_fwd.register_fake
def _(q, k, v, scale):
    B, H, T, _ = q.shape
    return (q.new_empty(B, H, T, v.shape[-1]), q.new_empty(B * H, T, dtype=torch.float32),
            q.new_empty(H, dtype=torch.float32))


@torch.library.custom_op("k2::flash_attention_bwd", mutates_args=())
def _bwd(d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv (contiguous, in the inputs' dtypes)."""
    from k2cli.model.triton_kernels import bwd_kv_kernel, bwd_q_kernel

    B, H, T, d = q.shape
    S, dv = k.shape[2], v.shape[-1]
    q, k, v, out, d_out = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), d_out.contiguous()
    delta = (d_out.float() * out.float()).sum(-1).view(B * H, T)  # D = rowsum(dO * O)
    cfg = _config(q, d, dv)
    dq, dk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(d_out), H, T, S, d, dv, scale)
    bwd_kv_kernel[(_cdiv(S, cfg["BLOCK_N"]), B * H)](q, k, v, d_out, lse, delta, dk, dvv, *common, **cfg)
    bwd_q_kernel[(_cdiv(T, cfg["BLOCK_M"]), B * H)](q, k, v, d_out, lse, delta, dq, *common, **cfg)
    return dq, dk, dvv


@_bwd.register_fake
def _(d_out, q, k, v, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(ctx, d_out, _d_lse, _d_head_max):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _bwd(d_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale, causal) v -> (out [B, H, T, dv], per-head max logit [H], float32, no grad).

    Under autocast the inputs take autocast's dtype (bf16), as for F.scaled_dot_product_attention;
    otherwise mixed dtypes are promoted. Gradients flow back in each input's own dtype.
    """
    if not available():
        raise RuntimeError("flash_attention needs triton (pip install triton; Linux x86-64)")
    if torch.is_autocast_enabled(q.device.type):  # like F.scaled_dot_product_attention: autocast's dtype
        dtype = torch.get_autocast_dtype(q.device.type)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _, head_max = _fwd(q.to(dtype), k.to(dtype), v.to(dtype), scale)
    return out, head_max.detach()
