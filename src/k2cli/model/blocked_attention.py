"""Causal attention in blocks of query rows, with QK-Clip's max-logit statistic for free.

Shapes: B batch, H heads, T query tokens, S >= T key tokens, d query/key width, dv value
width; BH = B * H. Query t sits at absolute position S - T + t and sees keys 0 .. S - T + t
(plain causal attention when S == T; a chunk after a KV cache when S > T).

Why not `F.scaled_dot_product_attention` everywhere? Two reasons, both measured (see
benchmarks/RESULTS.md, "profile"):
  * training needs the per-head max pre-softmax logit (QK-Clip's input). A fused kernel never
    shows its scores, so the statistic costs a second pass that recomputes every score — about
    half of the attention's own forward matmul work, and a full [B, H, T, S] temporary.
    Here each block's scores exist once, and their row maxima — which a numerically stable
    softmax computes anyway — ARE the statistic: it costs one tiny reduction.
  * on CPU, PyTorch's flash-attention kernel is slow at MLA's head sizes (its backward most
    of all); plain batched matmuls over blocks that fit in the L2 cache run near matmul peak.
On CUDA the fused kernel wins by far, so `attention.py` uses this module on CPU only (and for
the statistic alone, `max_logit_per_head`, on any device).

Forward, for each block of n query rows [s, e), against the kv = S - T + e keys it can see:
    scores = q_blk k_vis^T * scale + bias        [BH, n, kv]; bias = -inf above the diagonal
    m      = rowmax(scores)                       [BH, n]   -> the statistic: max over (B, rows)
    p      = exp(scores - m) / rowsum(...)        softmax, in place
    out    = p v_vis                              [BH, n, dv]
Keys after a block's last row are never touched, so the work is (1 + 1/blocks) / 2 of the
full T x S square (flash attention skips the same blocks).

Backward (the standard attention gradient; D = rowsum(dO * O), [BH, T]):
    dV += p^T dO_blk      dP = dO_blk V^T      dS = p * (dP - D)
    dQ_blk = dS K * scale                      dK += dS^T Q_blk * scale
Dtypes (model/precision.py): q, k, v and the matmuls run in q's dtype (bf16 or float32);
the softmax and its statistics — row max, exp and sums, log-sum-exp, the per-head max — in
float32 (float64 for float64 inputs), cast to q's dtype only to multiply by v (forward) or
to form dS (backward). In float32 every cast is a no-op.

p is kept from the forward when all blocks together fit KEEP_PROBS_BYTES; past that it is
recomputed from q, k and the row log-sum-exp (as flash attention does), so long sequences
cost O(T) memory rather than O(T^2).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Keep the softmax probabilities for the backward when they take at most this many bytes per
# call (one layer); longer sequences recompute them (one extra matmul per block).
KEEP_PROBS_BYTES = 256 * 2**20
# Query rows per block. Measured on CPU (tiny and small head sizes, T = 256..1024, with and
# without backward): 32 and 64 are within a few percent of each other and of the best, 16 pays
# Python overhead per block, 128+ falls out of the L2 cache.
BLOCK_ROWS = 64


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics (scores' row max, exp, sums, log-sum-exp) run in float32 at least."""
    return torch.promote_types(dtype, torch.float32)


def _block_bias(n: int, kv: int, like: Tensor) -> Tensor:
    """[n, kv] additive mask of one block: row i sees keys 0 .. kv - n + i (0), not the rest (-inf)."""
    upper = torch.full((n, n), float("-inf"), dtype=like.dtype, device=like.device).triu_(1)
    return torch.cat((upper.new_zeros(n, kv - n), upper), dim=1)


def _block_scores(qf: Tensor, kf: Tensor, s: int, e: int, offset: int, scale: float) -> Tensor:
    """Masked, scaled scores of query rows [s, e) against the keys they see: [BH, e - s, offset + e]."""
    kv = offset + e
    return torch.baddbmm(_block_bias(e - s, kv, qf), qf[:, s:e], kf[:, :kv].mT, alpha=scale)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float):
        B, H, T, d = q.shape
        S, dv = k.shape[2], v.shape[-1]
        offset = S - T
        dtype, acc = q.dtype, _softmax_dtype(q.dtype)
        qf, kf, vf = q.reshape(B * H, T, d), k.reshape(B * H, S, d), v.reshape(B * H, S, dv)
        out = []  # per block [BH, rows, dv] (concatenated, not written into slices with out=: torch.compile needs that)
        lse = q.new_empty(B * H, T, dtype=acc)  # row log-sum-exp of the scaled scores, for a recomputing backward
        head_max = torch.full((H,), float("-inf"), dtype=torch.float32, device=q.device)
        n = BLOCK_ROWS
        grad = any(ctx.needs_input_grad[:3])
        keep = grad and B * H * T * S * torch.finfo(acc).bits // 16 <= KEEP_PROBS_BYTES
        probs = []
        for s in range(0, T, n):
            e = min(T, s + n)
            p = _block_scores(qf, kf, s, e, offset, scale).to(acc)  # [BH, rows, kv]
            m = p.amax(dim=-1, keepdim=True)  # [BH, rows, 1]; finite: every row sees its own key
            head_max = torch.maximum(head_max, m.view(B, H, e - s).amax(dim=(0, 2)).float())
            p.sub_(m).exp_()
            total = p.sum(dim=-1, keepdim=True)
            p.div_(total)
            lse[:, s:e] = (m + total.log()).squeeze(-1)
            out.append(torch.bmm(p.to(dtype), vf[:, : offset + e]))
            if keep:
                probs.append(p)
        out = torch.cat(out, dim=1)  # [BH, T, dv]
        if grad:
            ctx.save_for_backward(qf, kf, vf, out, lse)
            ctx.probs, ctx.scale, ctx.n, ctx.shape = probs, scale, n, (B, H, T, S, d, dv)
        ctx.mark_non_differentiable(head_max)
        return out.view(B, H, T, dv), head_max

    @staticmethod
    def backward(ctx, d_out: Tensor, _d_head_max):
        qf, kf, vf, out, lse = ctx.saved_tensors
        B, H, T, S, d, dv = ctx.shape
        scale, n, offset = ctx.scale, ctx.n, S - T
        dtype, acc = qf.dtype, lse.dtype
        do = d_out.reshape(B * H, T, dv).to(dtype)
        D = (do.to(acc) * out.to(acc)).sum(dim=-1, keepdim=True)  # [BH, T, 1]
        dq, dk, dvv = [], torch.zeros_like(kf), torch.zeros_like(vf)
        for i, s in enumerate(range(0, T, n)):
            e = min(T, s + n)
            kv = offset + e
            if ctx.probs:
                p = ctx.probs[i]
            else:  # recompute: p = exp(scores - lse)
                p = _block_scores(qf, kf, s, e, offset, scale).to(acc).sub_(lse[:, s:e, None]).exp_()
            dvv[:, :kv].baddbmm_(p.to(dtype).mT, do[:, s:e])
            ds = torch.bmm(do[:, s:e], vf[:, :kv].mT).to(acc).sub_(D[:, s:e]).mul_(p).to(dtype)  # dS = p * (dP - D)
            dq.append(torch.bmm(ds, kf[:, :kv]))
            dk[:, :kv].baddbmm_(ds.mT, qf[:, s:e])
        ctx.probs = None
        dq = torch.cat(dq, dim=1)
        dq.mul_(scale)
        dk.mul_(scale)
        return dq.view(B, H, T, d), dk.view(B, H, S, d), dvv.view(B, H, S, dv), None


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale, causal) v -> (out [B, H, T, dv], per-head max logit [H], float32, no grad)."""
    return _CausalAttention.apply(q, k, v, scale)


@torch.no_grad()
def max_logit_per_head(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Only the statistic, for when a fused kernel computes the attention: [H], float32.

    Same blocks as above (visible keys only, no [B, H, T, S] temporary), in float32.
    """
    B, H, T, d = q.shape
    S = k.shape[2]
    qf, kf = q.reshape(B * H, T, d).float(), k.reshape(B * H, S, d).float()  # float32 scores whatever q's dtype
    n = BLOCK_ROWS
    best = torch.full((H,), float("-inf"), dtype=torch.float32, device=q.device)
    for s in range(0, T, n):
        e = min(T, s + n)
        rows = _block_scores(qf, kf, s, e, S - T, scale).amax(dim=-1)  # [BH, rows]
        best = torch.maximum(best, rows.view(B, H, e - s).amax(dim=(0, 2)))
    return best
