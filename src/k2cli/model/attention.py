"""Multi-head Latent Attention (MLA), as in DeepSeek-V2/V3 and Kimi K2.

Shapes: B batch, T query tokens, S key tokens, H heads, D hidden,
dn = qk_nope_head_dim, dr = qk_rope_head_dim, dv = v_head_dim, r = kv_lora_rank.

    queries  q = W_qb(RMSNorm(W_qa x))            [B, T, H, dn + dr]   (or q = W_q x)
             q^C, q^R = split(q)                  q^R gets RoPE, per head
    latent   c, k^R = split(W_kva x)              c [B, S, r], k^R [B, S, dr]: ONE rope key for all heads
    keys/v   k^C, v = split(W_kvb RMSNorm(c))     per head [B, S, H, dn], [B, S, H, dv]
    scores   (q^C . k^C + q^R . k^R) * softmax_scale

Only RMSNorm(c) and rope(k^R) — r + dr numbers per token and layer — are ever cached.
Two ways to compute the same attention:

  * expanded (training, prefill): up-project the latent to per-head keys and values, then
    causal attention: on CPU blocked matmuls that also yield the max-logit statistic for
    free (blocked_attention.py), elsewhere one fused scaled_dot_product_attention call;
  * absorbed (decoding): fold W_kvb into the query and output sides, so each new token
    attends directly over the cached latent (multi-query attention with r + dr wide keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2cli.model.blocked_attention import causal_attention, max_logit_per_head
from k2cli.model.config import ModelConfig
from k2cli.model.norm import RMSNorm
from k2cli.model.precision import Linear
from k2cli.model.rope import apply_rope, softmax_scale
from k2cli.model.triton_attention import flash_attention, use_triton

# Decode with the absorbed form when a call brings at most this many new tokens on top of
# a cache; longer chunks (prefill) are cheaper expanded.
ABSORB_MAX_NEW_TOKENS = 8

# Which kernel computes unmasked causal attention in the expanded form:
#   "auto"    blocked matmuls on CPU (faster there, and the statistic is free),
#             F.scaled_dot_product_attention elsewhere (fused flash kernels on CUDA)
#   "blocked" / "sdpa"  force one (tests compare them)
# Calls with an explicit mask (padded batches) always use scaled_dot_product_attention.
ATTENTION_BACKEND = "auto"


def use_blocked(q: torch.Tensor) -> bool:
    if ATTENTION_BACKEND != "auto":
        return ATTENTION_BACKEND == "blocked"
    return q.device.type == "cpu"


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = H = cfg.num_attention_heads
        self.dn, self.dr, self.dv, self.r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        D, dqk = cfg.hidden_size, cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)  # HF: eps 1e-6 regardless of rms_norm_eps
            self.q_b_proj = Linear(cfg.q_lora_rank, H * dqk, bias=False)
        else:
            self.q_proj = Linear(D, H * dqk, bias=False)
        self.kv_a_proj_with_mqa = Linear(D, self.r + self.dr, bias=False)
        self.kv_a_layernorm = RMSNorm(self.r, eps=1e-6)
        self.kv_b_proj = Linear(self.r, H * (self.dn + self.dv), bias=False)
        self.o_proj = Linear(H * self.dv, D, bias=False)
        self.softmax_scale = softmax_scale(cfg)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x, cos, sin, mask=None, cache=None, max_logit: bool = False):
        """x [B, T, D]; cos/sin [B, T, dr/2]; mask: None (plain causal) or bool [B, 1, T, S].

        `cache` (a `KVCache`) receives this call's latents and returns the whole history.
        Returns out [B, T, D], or with `max_logit` (out, per-head max logit [H], float32, no
        grad; None when decoding over a cache, which training never does).
        """
        B, T, _ = x.shape
        H, dn, dr = self.n_heads, self.dn, self.dr
        q = self.queries(x).view(B, T, H, dn + dr).transpose(1, 2)  # [B, H, T, dn+dr]
        q_nope, q_rope = q.split([dn, dr], dim=-1)
        q_rope = apply_rope(q_rope, cos[:, None], sin[:, None])
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.r, dr], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, T, r]
        k_rope = apply_rope(k_rope, cos, sin)  # [B, T, dr]

        if cache is not None:
            past = cache.length
            latent, k_rope = cache.append(self.layer_idx, latent, k_rope)  # [B, S, r], [B, S, dr]
            if past > 0 and T <= ABSORB_MAX_NEW_TOKENS:
                out = self._absorbed(q_nope, q_rope, latent, k_rope, mask)
                out = self.o_proj(out.transpose(1, 2).reshape(B, T, H * self.dv))
                return (out, None) if max_logit else out

        S = latent.shape[1]
        kv = self.kv_b_proj(latent).view(B, S, H, dn + self.dv).transpose(1, 2)  # [B, H, S, dn+dv]
        k_nope, v = kv.split([dn, self.dv], dim=-1)
        k = torch.cat((k_nope, k_rope[:, None].expand(B, H, S, dr)), dim=-1)  # [B, H, S, dn+dr]
        q = torch.cat((q_nope, q_rope), dim=-1)
        if mask is None and (use_blocked(q) or use_triton(q)):  # the statistic for free: blocked (CPU), Triton (CUDA)
            out, head_max = (causal_attention if use_blocked(q) else flash_attention)(q, k, v, self.softmax_scale)
            out = self.o_proj(out.transpose(1, 2).reshape(B, T, H * self.dv))  # out [B, H, T, dv], head_max [H]
            return (out, head_max) if max_logit else out
        head_max = per_head_max_logit(q, k, self.softmax_scale, mask) if max_logit else None
        causal = mask is None and T == S
        if mask is None and T != S:  # a chunk after a cache: token t sees the past and itself
            mask = _offset_causal_mask(T, S, x.device)
        if self.dv < dn + dr:
            # Fused (flash) kernels want values as wide as keys: pad with zeros, slice after.
            v = F.pad(v, (0, dn + dr - self.dv))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale)
        out = self.o_proj(out[..., : self.dv].transpose(1, 2).reshape(B, T, H * self.dv))
        return (out, head_max) if max_logit else out

    def _absorbed(self, q_nope, q_rope, latent, k_rope, mask):
        """Attention computed over the latent cache: W_kvb folded into query and output.

        q^C . k^C = q^C . (W_k c) = (W_k^T q^C) . c, so each head's query is mapped into the
        latent space once, and all heads share the same keys (c and k^R): multi-query attention
        over the cache, written as plain matmuls with the heads folded into the rows
        ([B, H*T, .] @ [B, ., S]): no per-head copy of the cache, no cat of c and k^R.
        """
        B, H, T, _ = q_nope.shape
        S, r = latent.shape[1], self.r
        w = self.kv_b_proj.weight.to(q_nope.dtype).view(H, self.dn + self.dv, r)  # float32 weight, compute dtype
        w_k, w_v = w[:, : self.dn], w[:, self.dn :]  # [H, dn, r], [H, dv, r]
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_k)  # [B, H, T, r]
        # scores = (q_latent . c + q^R . k^R) * scale, heads folded into rows: [B, H*T, S]
        scores = torch.bmm(q_rope.reshape(B, H * T, self.dr), k_rope.mT)
        scale = self.softmax_scale
        scores = torch.baddbmm(scores, q_latent.reshape(B, H * T, r), latent.mT, beta=scale, alpha=scale)
        scores = scores.view(B, H, T, S)
        if mask is None and T > 1:
            mask = _offset_causal_mask(T, S, scores.device)
        if mask is not None:
            scores = scores.masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(B, H * T, S)
        out_latent = torch.bmm(probs, latent).view(B, H, T, r)  # [B, H, T, r]
        return torch.einsum("bhtr,hvr->bhtv", out_latent, w_v)  # [B, H, T, dv]


def _offset_causal_mask(T: int, S: int, device) -> torch.Tensor:
    """Bool [T, S]: query t (absolute position S - T + t) sees keys 0..S-T+t."""
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    return torch.arange(S, device=device)[None, :] <= q_pos


@torch.no_grad()
def per_head_max_logit(q: torch.Tensor, k: torch.Tensor, scale: float, mask=None, chunk: int = 8) -> torch.Tensor:
    """The QK-Clip statistic: per head, the largest pre-softmax logit over the batch.

    q [B, H, T, d], k [B, H, S, d] -> [H]. Signed (not absolute), causal: masked positions
    never count. Computed in float32, a few sequences at a time to bound memory.
    """
    if mask is None:  # causal: blocks of visible keys only (blocked_attention.py)
        return max_logit_per_head(q, k, scale)
    B, H, T, _ = q.shape
    best = torch.full((H,), float("-inf"), device=q.device)
    for s in range(0, B, chunk):
        scores = torch.matmul(q[s : s + chunk].float(), k[s : s + chunk].float().transpose(-1, -2)) * scale
        m = mask if mask.dim() == 2 else mask[s : s + chunk]
        scores = scores.masked_fill(~m, float("-inf"))
        best = torch.maximum(best, scores.amax(dim=(0, 2, 3)))
    return best
