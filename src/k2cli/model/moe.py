"""Fine-grained Mixture of Experts with shared experts (DeepSeek-V3 / Kimi K2 style).

Shapes: N tokens (batch and time flattened), D hidden, E routed experts, K experts per
token, I expert width.

    scores  s = sigmoid(x W_g^T)                                 [N, E], float32
    select  top-K of (s + b), b the correction bias (selection only; never a weight)
            optionally only within the best `topk_group` of `n_group` expert groups
    weights w = s[selected] / sum(s[selected]) * routed_scaling_factor
    output  sum_k w_k * Expert_k(x) + SharedExperts(x)

Dispatch sorts the N*K (token, expert) pairs by expert so each expert runs one matmul on
a contiguous slice — `torch._grouped_mm` does all experts in one call — then each token's
K results are scatter-added back to it. No Python loop touches tokens or (with grouped_mm)
experts.

Balancing, used by training:
  * aux-loss-free: after each step b_i -= rate if expert i was overloaded, += rate if
    underloaded (`update_router_biases`); the update is a sign rule, not a gradient.
  * sequence-wise balance loss L = sum_i f_i P_i per sequence (returned by `MoE.forward`
    with stats=True, with the expert counts; the training loop weights it by a small alpha).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2cli.model.config import ModelConfig
from k2cli.model.precision import Linear

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


class DenseMLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = Linear(hidden, width, bias=False)
        self.up_proj = Linear(hidden, width, bias=False)
        self.down_proj = Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # float32 always: it moves in steps of ~1e-3 that bf16 could not represent.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        """x [N, D] -> expert ids [N, K], combine weights [N, K], scores [N, E]."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores.detach() + self.e_score_correction_bias.float()
        if self.n_group > 1:
            N, E = choice.shape
            grouped = choice.view(N, self.n_group, E // self.n_group)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]: sum of each group's top 2
            keep = group_score.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(N, E)
        idx = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, idx)  # the ORIGINAL scores: the bias never weighs outputs
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return idx, weights * self.routed_scaling_factor, scores


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert; expert e multiplies its `counts[e]` rows by w[e] [in, out].

    The float32 expert weights are cast to the activations' dtype here (autocast does not
    cover torch._grouped_mm; a no-op in float32).
    """
    w = w.to(x.dtype)
    if torch.compiler.is_compiling():
        # One opaque op for dynamo/inductor (whose meta kernel for _grouped_mm accepts bf16 only):
        # the graph stays whole, and no .tolist() of the paths below enters it.
        return _compiled_grouped_mm(x, w, counts.cumsum(0).to(torch.int32))
    if x.shape[0] < w.shape[0] and x.device.type == "cpu":
        # Fewer rows than experts (decoding): most experts are idle. On CPU one matmul per busy
        # expert beats walking all E groups (and beats gathering each row's expert matrix: a
        # copy of weights that are read once anyway). (On CUDA the kernel skips empty groups.)
        return torch.cat([x[s : s + n] @ w[e] for e, s, n in _busy_experts(counts)])
    if HAS_GROUPED_MM and (x.dtype == torch.bfloat16 or (x.device.type == "cpu" and x.dtype != torch.float64)):
        return torch._grouped_mm(x, w, offs=counts.cumsum(0).to(torch.int32))
    return _per_expert_mm(x, w, counts)


def _per_expert_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Fallback (old torch, float32 on CUDA, float64 anywhere): one matmul per expert slice."""
    return torch.cat([xe @ we for xe, we in zip(x.split(counts.tolist()), w.unbind(0))])


@torch.library.custom_op("k2::grouped_mm", mutates_args=())
def _compiled_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [N, in] (rows sorted by expert), w [E, in, out], offs [E] int32 row ends -> [N, out]."""
    if HAS_GROUPED_MM and (x.dtype == torch.bfloat16 or (x.device.type == "cpu" and x.dtype != torch.float64)):
        return torch._grouped_mm(x, w, offs=offs)
    return _per_expert_mm(x, w, torch.diff(offs, prepend=offs.new_zeros(1)))


@_compiled_grouped_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("k2::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """dW[e] = x_e^T dy_e for each expert's rows: x [N, in], dy [N, out] -> [E, in, out]."""
    if HAS_GROUPED_MM and (x.dtype == torch.bfloat16 or (x.device.type == "cpu" and x.dtype != torch.float64)):
        return torch._grouped_mm(x.t(), dy, offs=offs)
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    return torch.stack([xe.t() @ ye for xe, ye in zip(x.split(counts), dy.split(counts))])


@_grouped_mm_weight_grad.register_fake
def _(x, dy, offs):
    return x.new_empty(offs.shape[0], x.shape[1], dy.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _grouped_mm_backward(ctx, dy):
    x, w, offs = ctx.saved_tensors  # y = x_e w_e per expert: dx_e = dy_e w_e^T, dw_e = x_e^T dy_e
    dx = _compiled_grouped_mm(dy, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    dw = _grouped_mm_weight_grad(x, dy, offs) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_compiled_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _busy_experts(counts: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, rows) for every expert with rows, in sorted-row order."""
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out.append((e, start, n))
            start += n
    return out


def expert_counts(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64: how many (token, slot) pairs of idx chose each expert. (bincount's counts, with a
    static output shape — bincount's depends on the data — so that torch.compile keeps one graph.)"""
    flat = idx.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))


class Experts(nn.Module):
    """E SwiGLU experts stored as two 3-D tensors (Hugging Face's in-memory layout)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))  # gate rows first, then up
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        N, K = idx.shape
        flat = idx.reshape(-1)  # [N*K] expert of each (token, slot) pair
        order = flat.argsort(stable=True)  # pairs grouped by expert
        counts = expert_counts(flat, self.num_experts)
        token = order // K  # [N*K] the token of each pair, in expert order
        xs = x.index_select(0, token)  # [N*K, D]
        gate, up = grouped_mm(xs, self.gate_up_proj.transpose(1, 2), counts).chunk(2, dim=-1)  # [N*K, I] each
        # The combine weight scales an expert's output, and the down projection is linear, so it
        # scales the (narrower) hidden activation instead: w * down(h) = down(w * h). This saves
        # a [N, K, D] weighted sum whose backward is N tiny outer products.
        h = F.silu(gate) * up * weights.reshape(-1)[order, None].to(up.dtype)  # [N*K, I]
        ys = grouped_mm(h, self.down_proj.transpose(1, 2), counts)  # [N*K, D]
        # Sum each token's K outputs straight from expert order: a scatter-add, whose backward
        # is a gather (an un-sort then sum would need a zero-filled scatter in the backward).
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            DenseMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor, stats: bool = False):
        """x [B, T, D] -> out [B, T, D], or with `stats` (out, balance loss (scalar, grad), counts [E])."""
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        idx, weights, scores = self.gate(flat)
        out = self.experts(flat, idx, weights).view(B, T, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        if stats:
            return out, self._balance_loss(idx, scores, B, T), expert_counts(idx, self.num_experts)
        return out

    def _balance_loss(self, idx, scores, B: int, T: int) -> torch.Tensor:
        """Sequence-wise balance loss (DeepSeek-V3 eq. 17-20), averaged over sequences.

        f_i = E / (K T) * #{t : i in TopK(t)},  P_i = mean_t s_{i,t} / sum_j s_{j,t},  L = sum_i f_i P_i.
        It is 1 for perfectly balanced routing.
        """
        E, K = self.num_experts, self.top_k
        hits = torch.zeros(B, E, device=idx.device).scatter_add_(
            1, idx.view(B, T * K), torch.ones(B, T * K, device=idx.device)
        )
        f = hits * (E / (K * T))
        p = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)
        return (f * p).sum(-1).mean()


@torch.no_grad()
def update_router_biases(routers: list[Router], loads: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing: push each expert's bias towards the mean load.

    loads [n_moe_layers, E]: tokens routed to each expert in the last step (summed over
    data-parallel ranks by the caller). The update is centred (torchtitan does the same)
    so biases do not drift as a whole.
    """
    for router, load in zip(routers, loads):
        load = load.float()
        delta = rate * torch.sign(load.mean() - load)  # + when underloaded, - when overloaded
        router.e_score_correction_bias += delta - delta.mean()
