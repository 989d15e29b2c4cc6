"""MuonClip: Muon for the hidden matrices, AdamW for the rest, QK-Clip after each step.

Shapes: a "matrix" is A x B (rows x columns of the weight as stored, out x in for nn.Linear).

    Muon, per matrix (Moonlight, arXiv 2502.16982; K2 report Algorithm 1):
        M <- mu * M + G                                  momentum buffer, same shape as the param
        U <- G + mu * M      (nesterov)   or   U <- M
        O <- NS5(U)                                      ~ U V^T of U's SVD: every direction the same size
        W <- W * (1 - lr * wd) - lr * 0.2 * sqrt(max(A, B)) * O
    The 0.2 * sqrt(max(A, B)) factor gives the update an RMS of ~0.2 (NS5's output has RMS
    ~0.9/sqrt(max(A, B))), AdamW's typical update RMS, so one lr and one wd serve both halves.
    Weight decay uses the unadjusted lr (decoupled, as Moonlight and torch.optim.Muon do).

    AdamW: standard decoupled AdamW with bias correction, same lr and wd.

    QK-Clip (MuonClip only): after the step, heads whose max pre-softmax logit exceeded tau get
    their query/key weights rescaled so that the logit becomes exactly tau (see qk_clip.py).

Routing (who is optimised by what), decided once from the model's structure:
    Muon   every parameter with >= 2 dims inside the decoder layers: attention projections,
           dense/shared-expert MLP linears, the router weight [E, D] (a hidden matrix like any
           other: it maps the residual stream to E scores; Moonlight routes it to Muon too),
           and the expert tensors: gate_up_proj [E, 2I, D] as 2E separate [I, D] matrices
           (gate and up are different linear maps that only share storage), down_proj [E, D, I]
           as E matrices.
    AdamW  embeddings and lm_head (their rows are looked up / are per-token, not a hidden linear
           map; a tied pair is ONE tensor and appears once), with weight decay; every 1-D
           parameter (RMSNorm gains) without weight decay, the common practice (decaying a gain
           towards 0 has no regularising meaning). name="adamw" sends every parameter to AdamW
           with the same decay rule (2-D+ decayed, 1-D not).

Batching: Muon's cost is the Newton-Schulz matmuls. Matrices of the same shape are stacked and
orthogonalised in batched calls (torch.bmm over e.g. all layers' expert matrices at once); a tall
matrix is transposed first (NS works on the wide orientation anyway), so expert down_proj [D, I]
and gate/up [I, D] land in the same batch. Batches are cut into cache-sized chunks, and the
single-process step applies each chunk's update as soon as it is computed.

State (for exact checkpoint round trips) lives only in `self.state`, as tensors:
    Muon param:  momentum_buffer (param's full shape and dtype; under torchrun only on its owner)
    AdamW param: step (float32 scalar, CPU), exp_avg, exp_avg_sq (the param's local shard under FSDP)
Checkpoints use `canonical_state_dict()`: every tensor whole, keyed by parameter name, so a
state saved by N ranks loads on M (`load_canonical_state_dict`).

Distributed Muon (under torchrun; W ranks). Newton-Schulz of a row shard is NOT the shard of
Newton-Schulz of the matrix (it orthogonalises a different matrix), so every matrix is
orthogonalised on its full form, exactly once, by the one rank that owns it:
    owners   each Muon tensor (a batch of n matrices A x B) goes to one rank, decided once by
             greedy balancing of the Newton-Schulz cost n * min(A,B)^2 * max(A,B) (`assign_owners`);
             the owner alone keeps its momentum (sharded optimizer state, ZeRO-1 style)
    step     1. the owner gets the full gradient: with DDP it already has it (all-reduced in
                backward); with FSDP every rank sends the owner its rows (one all_to_all)
             2. the owner updates momentum and runs Newton-Schulz on its matrices (batched)
             3. the updates go back: with DDP every rank receives every update (one all_to_all,
                the same as an all-gather); with FSDP each rank receives only its rows
             4. every rank applies weight decay and the update to what it holds
    AdamW parameters are plain: replicated (DDP) or sharded element-wise (FSDP); AdamW is local.
Every rank thus applies bit-for-bit the same update to the same weights, and the result equals
one process on the global batch up to the order of floating-point sums in the gradients.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from k2cli import parallel
from k2cli.errors import K2Error, did_you_mean
from k2cli.model.moe import Experts
from k2cli.optim.qk_clip import clip_heads

OPTIMIZERS = ("muonclip", "muon", "adamw")
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz (Keller Jordan's Muon)


@dataclass
class OptimConfig:
    """Recipe section `optim`."""

    name: str = "muonclip"  # muonclip (Muon + QK-Clip) | muon | adamw
    lr: float = 2e-3  # peak lr, shared by the Muon (via RMS matching) and AdamW parts
    weight_decay: float = 0.1
    momentum: float = 0.95  # Muon momentum
    nesterov: bool = True
    ns_steps: int = 5  # Newton-Schulz iterations
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    qk_clip_tau: float = 100.0  # max pre-softmax logit per head (muonclip only); K2 uses 100

    def validate(self) -> None:
        if self.name not in OPTIMIZERS:
            raise K2Error(f"unknown optimizer optim.name='{self.name}'", did_you_mean(self.name, OPTIMIZERS))

        def bad(key, value, rule, example):
            raise K2Error(f"optim.{key}={value!r} is invalid: it must be {rule}", f"set e.g. --set optim.{key}={example}")

        if not (math.isfinite(self.lr) and self.lr > 0):
            bad("lr", self.lr, "a positive number", "2e-3")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            bad("weight_decay", self.weight_decay, ">= 0 (0 disables decay)", "0.1")
        if self.lr * self.weight_decay >= 1:
            raise K2Error(
                f"optim.lr * optim.weight_decay = {self.lr * self.weight_decay:g} >= 1 would flip or zero the weights each step",
                "lower optim.weight_decay (K2 uses 0.1) or optim.lr",
            )
        if not 0 <= self.momentum < 1:
            bad("momentum", self.momentum, "in [0, 1)", "0.95")
        if not 1 <= self.ns_steps <= 100:
            bad("ns_steps", self.ns_steps, "between 1 and 100 (5 is standard)", "5")
        if not 0 <= self.adam_beta1 < 1:
            bad("adam_beta1", self.adam_beta1, "in [0, 1)", "0.9")
        if not 0 <= self.adam_beta2 < 1:
            bad("adam_beta2", self.adam_beta2, "in [0, 1)", "0.95")
        if not (math.isfinite(self.adam_eps) and self.adam_eps > 0):
            bad("adam_eps", self.adam_eps, "a small positive number", "1e-8")
        if not (math.isfinite(self.qk_clip_tau) and self.qk_clip_tau > 0):
            bad("qk_clip_tau", self.qk_clip_tau, "a positive logit bound (K2 uses 100)", "100")


# ----------------------------------------------------------------------------- Muon, functional


def newton_schulz(G: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise G [..., A, B]: ~ U V^T where G = U S V^T, batched over '...'.

    Quintic iteration X <- a X + (b A + c A^2) X with A = X X^T, on X = G / ||G||_F (per matrix,
    so every singular value starts in (0, 1]). The coefficients push small singular values up
    fast rather than converging exactly: outputs land in roughly [0.7, 1.1], which is all Muon
    needs. Works on the wide orientation (A <= B) so that X X^T is the small Gram matrix.
    Computed in bfloat16 on CUDA (tensor cores; the iteration is stable in bf16) and float32
    elsewhere (CPU bf16 matmuls are slow and imprecise); returned in G's dtype.
    """
    assert G.ndim >= 2, f"newton_schulz needs matrices, got shape {tuple(G.shape)}"
    a, b, c = NS_COEFFS
    lead, (rows, cols) = G.shape[:-2], G.shape[-2:]
    X = G.reshape(-1, rows, cols).to(torch.bfloat16 if G.is_cuda else torch.float32)  # [N, A, B]
    tall = rows > cols
    if tall:
        X = X.mT  # [N, B, A], wide
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # a new tensor: G itself is never written
    for _ in range(steps):
        gram = X @ X.mT  # [N, a, a], a = min(A, B)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b*gram + c*gram@gram
        X = torch.baddbmm(X, poly, X, beta=a)  # a*X + poly@X
    if tall:
        X = X.mT
    return X.reshape(*lead, rows, cols).to(G.dtype)


def rms_scale(rows: int, cols: int) -> float:
    """Moonlight's RMS matching: NS output * this has RMS ~0.2, like an AdamW update."""
    return 0.2 * math.sqrt(max(rows, cols))


def momentum_direction(grad: Tensor, momentum_buf: Tensor, momentum: float, nesterov: bool) -> Tensor:
    """M <- mu*M + G in place; returns the direction to orthogonalise, G + mu*M (nesterov) or M.

    (torch.optim.Muon and Keller Jordan's code keep the EMA form M <- lerp(M, G, 1 - mu), which is
    (1 - mu) times this M; Newton-Schulz normalises the scale away, so the updates agree.)
    """
    momentum_buf.mul_(momentum).add_(grad)
    return grad.add(momentum_buf, alpha=momentum) if nesterov else momentum_buf


def muon_update(grad: Tensor, momentum_buf: Tensor, *, momentum: float = 0.95, nesterov: bool = True,
                ns_steps: int = 5) -> Tensor:
    """The whole per-matrix Muon rule for one tensor of matrices [..., A, B] (unbatched across
    tensors): updates momentum_buf in place, returns the scaled update O * 0.2*sqrt(max(A, B)).

    The caller applies W <- W*(1 - lr*wd) - lr*update. Distributed code can call this on the
    full (gathered) matrices a rank owns; MuonClip.step does the same with cross-tensor batching.
    """
    U = momentum_direction(grad, momentum_buf, momentum, nesterov)
    return newton_schulz(U, ns_steps) * rms_scale(*grad.shape[-2:])


# Newton-Schulz batches are cut into chunks of at most this many elements. Measured on CPU: one
# [693, 256, 512] batch (all expert matrices of the `small` preset) runs at ~60% of matmul peak
# because the elementwise parts stream 360 MB through memory; 8 MB chunks stay in cache and run
# at peak (2x faster). On CUDA big batches are what the GPU wants; the cap only bounds the
# temporaries (~4 x 256 MB in bf16).
NS_CHUNK_ELEMENTS = {"cpu": 2**21, "cuda": 2**27}


def _wide(m: Tensor) -> Tensor:
    return m.mT if m.shape[-2] > m.shape[-1] else m


def orthogonalized_batches(mats: list[Tensor], steps: int = 5):
    """newton_schulz over mats[i] [n_i, A_i, B_i], all same-shape matrices batched together, in
    cache-sized chunks: yields (pieces, O) per chunk, where O [n, a, b] (a <= b: tall matrices are
    transposed to wide first, so [A, B] and [B, A] share a batch) holds, in order, matrices
    j0:j1 of mats[i] for each (i, j0, j1) in pieces.

    Consuming a chunk while it is still in cache (MuonClip applies the update right away) saves
    writing every result to memory and reading it back. The inputs are never written.
    """
    buckets: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        w = _wide(m)
        buckets.setdefault((tuple(w.shape[-2:]), w.dtype, w.device), []).append(i)
    for ((a, b), _dtype, device), idx in buckets.items():
        chunk = max(1, NS_CHUNK_ELEMENTS.get(device.type, 2**27) // (a * b))  # matrices per chunk
        pieces, parts, filled = [], [], 0
        for i in idx:
            w, j = _wide(mats[i]), 0
            while j < w.shape[0]:
                take = min(w.shape[0] - j, chunk - filled)
                pieces.append((i, j, j + take))
                parts.append(w[j : j + take])
                filled, j = filled + take, j + take
                if filled == chunk:
                    yield pieces, newton_schulz(torch.cat(parts) if len(parts) > 1 else parts[0], steps)
                    pieces, parts, filled = [], [], 0
        if pieces:
            yield pieces, newton_schulz(torch.cat(parts) if len(parts) > 1 else parts[0], steps)


def orthogonalize(mats: list[Tensor], steps: int = 5) -> list[Tensor]:
    """newton_schulz on each of mats[i] [n_i, A_i, B_i], batching all same-shape matrices together
    (`orthogonalized_batches`). Returns new tensors with the shapes of `mats`."""
    out = [torch.empty(_wide(m).shape, dtype=m.dtype, device=m.device) for m in mats]
    for pieces, O in orthogonalized_batches(mats, steps):
        for (i, j0, j1), o in zip(pieces, O.split([j1 - j0 for _, j0, j1 in pieces])):
            out[i][j0:j1] = o
    return [o.mT if m.shape[-2] > m.shape[-1] else o for o, m in zip(out, mats)]


def ns_cost(n: int, rows: int, cols: int) -> int:
    """Newton-Schulz work for n matrices rows x cols (the Gram matmuls dominate): n * a^2 * b."""
    a, b = sorted((rows, cols))
    return n * a * a * b


def assign_owners(costs: list[float], world: int) -> list[int]:
    """Rank owning each item: greedy, biggest first, each to the least loaded rank (ties: lowest
    rank). Deterministic, so every rank computes the same plan on its own."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


# ----------------------------------------------------------------------------- routing


def _expert_matrix_shapes(model: nn.Module) -> dict[int, tuple[int, int]]:
    """id(param) -> the matrix shape it is a batch of, for the 3-D expert tensors."""
    shapes = {}
    for m in model.modules():
        if isinstance(m, Experts):
            E, two_i, D = m.gate_up_proj.shape
            shapes[id(m.gate_up_proj)] = (two_i // 2, D)  # [E, 2I, D] = [2E, I, D]: gate_e, up_e, ...
            shapes[id(m.down_proj)] = tuple(m.down_proj.shape[1:])  # [E, D, I]: E matrices [D, I]
    return shapes


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """The routing described at the top of this file, as optimizer param groups (empty ones dropped).

    named_parameters() yields each tensor once, so a tied embedding/lm_head is one entry.
    """
    expert_shapes = _expert_matrix_shapes(model)
    muon, muon_shapes, decay, no_decay = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.name != "adamw" and p.ndim >= 2 and name.startswith("layers."):
            muon.append(p)
            muon_shapes.append(expert_shapes.get(id(p), tuple(p.shape[-2:])))
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    groups = [
        dict(name="muon", kind="muon", params=muon, matrix_shapes=muon_shapes, weight_decay=cfg.weight_decay,
             momentum=cfg.momentum, nesterov=cfg.nesterov, ns_steps=cfg.ns_steps),
        dict(name="adamw", kind="adamw", params=decay, weight_decay=cfg.weight_decay, betas=betas, eps=cfg.adam_eps),
        dict(name="adamw_no_decay", kind="adamw", params=no_decay, weight_decay=0.0, betas=betas, eps=cfg.adam_eps),
    ]
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------- the optimizer


class MuonClip(torch.optim.Optimizer):
    """Muon + AdamW in one optimizer (one state_dict), with QK-Clip for name="muonclip".

    Each group carries 'lr' (set by the schedule via set_lr) and 'initial_lr' (= cfg.lr).
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig):
        cfg.validate()
        self.cfg = cfg
        groups = param_groups(model, cfg)
        for g in groups:
            g["initial_lr"] = cfg.lr
        super().__init__(groups, dict(lr=cfg.lr, weight_decay=cfg.weight_decay))
        # QK-Clip rescales attention weights in place; keep the layers (not part of the state).
        self.attn_layers = model.attention_layers() if hasattr(model, "attention_layers") else []
        self.names = {p: name for name, p in model.named_parameters()}  # canonical checkpoint keys
        self.rank, self.world = parallel.rank(), parallel.world_size()
        for p in self.names:
            parallel.check_row_sharded(p)
        # Muon tensor -> the rank that orthogonalises it and keeps its momentum (all 0 in one process)
        self.owner = {}
        for g in self.param_groups:
            if g["kind"] == "muon":
                costs = [ns_cost(p.numel() // (A * B), A, B) for p, (A, B) in zip(g["params"], g["matrix_shapes"])]
                self.owner.update(zip(g["params"], assign_owners(costs, self.world)))

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        if self.world > 1:
            return self._distributed_muon_step(group)
        params, dirs = [], []  # dirs[i]: [n, A, B], the direction to orthogonalise
        for p, (A, B) in zip(group["params"], group["matrix_shapes"]):
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            U = momentum_direction(p.grad, state["momentum_buffer"], group["momentum"], group["nesterov"])
            params.append(p)
            dirs.append(U.reshape(-1, A, B))
        if not params:
            return
        lr, wd = group["lr"], group["weight_decay"]
        # W <- W (1 - lr wd) - lr * rms_scale * O, applied chunk by chunk as Newton-Schulz yields
        # them (the same arithmetic as a whole-tensor update, element for element)
        for pieces, O in orthogonalized_batches(dirs, group["ns_steps"]):
            for (i, j0, j1), o in zip(pieces, O.split([j1 - j0 for _, j0, j1 in pieces])):
                A, B = dirs[i].shape[-2:]
                w = params[i].view(-1, A, B)[j0:j1]  # [j1 - j0, A, B]
                w.mul_(1 - lr * wd)
                w.add_(o.mT if A > B else o, alpha=-lr * rms_scale(A, B))

    def _distributed_muon_step(self, group: dict) -> None:
        """Muon with W ranks (module docstring): each matrix orthogonalised once, by its owner."""
        todo = [(p, AB) for p, AB in zip(group["params"], group["matrix_shapes"]) if p.grad is not None]
        if not todo:
            return
        W, me = self.world, self.rank
        sharded = parallel.is_dtensor(todo[0][0])  # FSDP: params and grads are row shards
        owned = [[p for p, _ in todo if self.owner[p] == r] for r in range(W)]  # owned[r]: rank r's, in order
        mine = [(p, AB) for p, AB in todo if self.owner[p] == me]
        dtype, device = parallel.local(todo[0][0].grad).dtype, parallel.local(todo[0][0]).device

        def rows(p, r):  # the shape of rank r's shard of p
            return (parallel.rows_per_rank(p.shape[0], W)[r], *p.shape[1:])

        # 1. the full gradient of every matrix this rank owns
        if sharded:  # everyone sends each owner its rows of the owner's matrices
            got = parallel.exchange([[parallel.local(p.grad) for p in owned[r]] for r in range(W)],
                                [[rows(p, s) for p, _ in mine] for s in range(W)], dtype, device)
            grads = [torch.cat([got[s][j] for s in range(W)]) for j in range(len(mine))]
        else:  # DDP: all-reduced during backward, whole on every rank
            grads = [p.grad for p, _ in mine]
        # 2. momentum and Newton-Schulz on full matrices, batched over this rank's matrices
        dirs = []
        for (p, (A, B)), g in zip(mine, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
            dirs.append(momentum_direction(g, state["momentum_buffer"], group["momentum"], group["nesterov"]).reshape(-1, A, B))
        orth = [O.reshape(p.shape) for O, (p, _) in zip(orthogonalize(dirs, group["ns_steps"]), mine)]
        # 3. every rank receives what it holds of every update: its rows (FSDP), or all of it (DDP)
        if sharded:
            starts = {p: [0] + list(itertools.accumulate(parallel.rows_per_rank(p.shape[0], W))) for p, _ in mine}
            out = [[O[starts[p][s] : starts[p][s + 1]] for O, (p, _) in zip(orth, mine)] for s in range(W)]
            got = parallel.exchange(out, [[rows(p, me) for p in owned[r]] for r in range(W)], dtype, device)
        else:
            got = parallel.exchange([orth] * W, [[tuple(p.shape) for p in owned[r]] for r in range(W)], dtype, device)
        update = {p: O for r in range(W) for p, O in zip(owned[r], got[r])}
        # 4. weight decay and the update, on every rank, to what it holds
        lr, wd = group["lr"], group["weight_decay"]
        for p, (A, B) in todo:
            w = parallel.local(p)
            w.mul_(1 - lr * wd)
            w.add_(update[p].view_as(w), alpha=-lr * rms_scale(A, B))

    def _adamw_step(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            w = parallel.local(p)  # the local shard under FSDP: AdamW is element-wise
            if not state:
                state["step"] = torch.tensor(0.0)  # float32 on CPU, as torch.optim.AdamW keeps it
                state["exp_avg"] = torch.zeros_like(w, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)
            params.append(w)
            grads.append(parallel.local(p.grad))
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1.0)
        # Bias corrections per parameter (a param without a grad on some step lags behind).
        t = [s.item() for s in steps]
        bc1 = [1 - beta1**n for n in t]
        bc2_sqrt = [math.sqrt(1 - beta2**n) for n in t]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)  # m <- b1 m + (1 - b1) g
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)  # v <- b2 v + (1 - b2) g^2
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        denom = torch._foreach_sqrt(exp_avg_sqs)  # sqrt(v_hat) + eps = sqrt(v)/sqrt(bc2) + eps
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / b for b in bc1])  # W -= lr m_hat / denom

    # ------------------------------------------------------------------ checkpoints

    def canonical_state_dict(self) -> dict | None:
        """The whole optimizer state keyed by parameter name, on rank 0 (None on the others, and
        every rank must call it: it gathers). Full tensors, whatever the world size or sharding,
        in the layout of torch.distributed.checkpoint.state_dict's full optimizer state dict:

            {"state": {name: {"momentum_buffer": T} | {"step": T, "exp_avg": T, "exp_avg_sq": T}},
             "param_groups": [{<options>, "params": [name, ...]}, ...]}

        Momentum is sent to rank 0 by its owner; FSDP's AdamW shards are all-gathered.
        """
        main = self.rank == 0
        mine = [self.names[p] for p, s in self.state.items() if "momentum_buffer" in s]
        held = [set(names) for names in parallel.all_gather_object(mine)]  # momentum: who holds what
        state = {}
        for group in self.param_groups:
            for p in group["params"]:
                name = self.names[p]
                if group["kind"] == "muon":
                    owner = self.owner[p]
                    if name in held[owner]:
                        buf = parallel.to_main(self.state[p]["momentum_buffer"] if owner == self.rank else None, owner,
                                           tuple(p.shape), parallel.local(p).dtype, parallel.local(p).device)
                        if main:
                            state[name] = {"momentum_buffer": buf.cpu()}
                elif self.state.get(p):  # AdamW: the same on every rank, full or sharded
                    entry = {k: parallel.full_from_local(p, v) for k, v in self.state[p].items()}
                    if main:
                        state[name] = {k: v.cpu() for k, v in entry.items()}
        if not main:
            return None
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [self.names[p] for p in g["params"]]}
                  for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_canonical_state_dict(self, sd: dict) -> None:
        """Load `canonical_state_dict()`'s output (from any world size) into this rank's share:
        momentum for the matrices it owns, its rows of AdamW's moments under FSDP."""
        saved = {n: g["name"] for g in sd["param_groups"] for n in g["params"]}
        ours = {self.names[p]: g["name"] for g in self.param_groups for p in g["params"]}
        if saved != ours:
            diff = sorted(set(saved.items()) ^ set(ours.items()))[:3]
            raise K2Error(f"the optimizer state does not fit this model and optimizer (first differences: {diff})",
                          "resume with the model and optim recipe that made it, or pass --restart")
        self.state.clear()
        for group in self.param_groups:
            for p in group["params"]:
                entry = sd["state"].get(self.names[p])
                if entry is None:
                    continue
                w = parallel.local(p)
                if group["kind"] == "muon":
                    if self.owner[p] == self.rank:
                        self.state[p] = {"momentum_buffer": entry["momentum_buffer"].to(w.device, w.dtype, copy=True)}
                else:
                    self.state[p] = {k: v.clone() if k == "step" else parallel.local_rows(p, v).to(w.device, w.dtype, copy=True)
                                     for k, v in entry.items()}

    @torch.no_grad()
    def clip_qk(self, max_logits: Tensor) -> Tensor:
        """QK-Clip with the per-layer per-head max logits [L, H] of the step's batch (all-reduced
        with MAX across ranks by the caller). Returns [L]: heads clipped per layer (zeros unless
        name == "muonclip")."""
        if self.cfg.name != "muonclip":
            return torch.zeros(max_logits.shape[0], dtype=torch.long, device=max_logits.device)
        return clip_heads(self.attn_layers, max_logits, self.cfg.qk_clip_tau)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> MuonClip:
    """The optimizer for `model` (always the unwrapped model: DDP/compile wrappers go around it)."""
    return MuonClip(model, cfg)
