"""QK-Clip for Multi-head Latent Attention (Kimi K2 report, arXiv 2507.20534, sec. 2.1).

After an optimizer step, every head h whose max pre-softmax logit S_h (over the step's batch,
signed, causal) exceeded tau gets gamma_h = tau / S_h, and its weights are rescaled so that
all of its logits are multiplied by exactly gamma_h:

    logit_h = (q^C_h . k^C_h + q^R_h . k^R) * softmax_scale
      q^C_h  (no-rope query)  rows of W_qb (or W_q)     * sqrt(gamma_h)
      k^C_h  (no-rope key)    rows of W_kvb              * sqrt(gamma_h)   -> q^C.k^C * gamma_h
      q^R_h  (rope query)     rows of W_qb (or W_q)      * gamma_h         -> q^R.k^R * gamma_h
      k^R    (rope key)       W_kva: SHARED by all heads, never touched
      values (W_kvb's value rows) and W_o: never touched (the clip changes logits only)

Weight layouts (out x in): W_qb [H*(dn+dr), q_in] is per head [q^C (dn rows) | q^R (dr rows)];
W_kvb [H*(dn+dv), r] is per head [k^C (dn rows) | v (dv rows)]. Everything involved is linear
(RMSNorms sit before these projections, RoPE after), so the scaling passes through exactly.
Heads at or below tau are multiplied by nothing at all (bit-identical).

Pure functions of the attention modules, so data-parallel code can call them on every rank
with the same all-reduced maxima and stay in sync.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def scale_head_logits(attn, gamma: Tensor) -> None:
    """Multiply every logit of head h of one MLAttention layer by gamma[h] ([H], > 0), in place.

    Written as one factor per weight row, so that it applies unchanged to a row shard of the
    weight (FSDP: each rank scales the rows it holds; the rows of unclipped heads get x1.0,
    which leaves them bit-identical).
    """
    H, dn, dr, dv = attn.n_heads, attn.dn, attn.dr, attn.dv
    q_proj = attn.q_b_proj if hasattr(attn, "q_b_proj") else attn.q_proj
    g = gamma.to(dtype=torch.float32)[:, None]  # [H, 1]
    # W_qb rows, per head [q^C (dn) | q^R (dr)]: sqrt(gamma) for q^C, gamma for q^R (its key partner
    # k^R is shared, so q^R takes the whole factor)
    q_rows = torch.cat([g.sqrt().expand(H, dn), g.expand(H, dr)], dim=1).reshape(-1)
    # W_kvb rows, per head [k^C (dn) | v (dv)]: sqrt(gamma) for k^C, values untouched
    kv_rows = torch.cat([g.sqrt().expand(H, dn), torch.ones(H, dv, device=g.device)], dim=1).reshape(-1)
    _scale_rows(q_proj.weight, q_rows)
    _scale_rows(attn.kv_b_proj.weight, kv_rows)


def _scale_rows(weight: Tensor, factors: Tensor) -> None:
    """weight[i, :] *= factors[i]; for a DTensor weight, on the rows this rank holds."""
    factors = factors.to(weight.device)[:, None]
    if hasattr(weight, "device_mesh"):  # DTensor (FSDP): cut the factors the way the rows are cut
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(factors, weight.device_mesh, weight.placements, src_data_rank=None).to_local()
        weight.to_local().mul_(local)
    else:
        weight.mul_(factors)


def heads_over(max_logits: Tensor, tau: float) -> Tensor:
    """[L, H] bool: the heads QK-Clip rescales (max logit above tau; a NaN maximum is never "over")."""
    return max_logits.float() > tau


@torch.no_grad()
def clip_heads(attn_layers: list, max_logits: Tensor, tau: float) -> Tensor:
    """QK-Clip over all layers. max_logits [L, H] -> [L] number of heads clipped per layer."""
    L = len(attn_layers)
    if max_logits.dim() != 2 or max_logits.shape[0] != L:
        raise ValueError(f"max_logits must be [L={L}, H], got {tuple(max_logits.shape)}")
    S = max_logits.float()
    over = heads_over(S, tau)  # [L, H]
    counts = over.sum(dim=1)
    for attn, s, o in zip(attn_layers, S, over):
        # only the clipped heads get a factor != 1; x * 1.0 == x exactly for the others. (Every
        # layer is scaled, clipped or not: asking which layers have a hit would wait on the device.)
        scale_head_logits(attn, torch.where(o, tau / s, torch.ones_like(s)))
    return counts
