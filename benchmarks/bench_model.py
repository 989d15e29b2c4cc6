"""k2 vs Hugging Face transformers' DeepseekV3 on the same weights, side by side, and k2 against
the machine's own matmul peak.

    python benchmarks/bench_model.py [--out benchmarks/RESULTS.md] [--presets tiny,small]
                                     [--sections train,breakdown,decode,mfu,moe] [--threads N] [--quick]

Sections (each measured in this one process; k2 and transformers interleaved call by call):
  train      forward + backward tokens/s. k2 also computes what training needs and transformers
             does not: the per-head max-logit statistic (QK-Clip's input) and the MoE balance
             loss. transformers runs with its fastest settings: sdpa attention, grouped_mm experts.
  breakdown  one whole MuonClip training step of the `small` recipe, part by part: data loading,
             forward, backward, gradient clipping, the optimizer (Newton-Schulz for Muon, AdamW),
             the max-logit statistic, QK-Clip, the aux-loss-free router-bias update.
  decode     greedy generation, prompt 512, batch 1 and 16: k2's latent cache with absorbed
             up-projections vs transformers `generate()` (its own KV cache).
  mfu        model FLOPs utilisation of the training step against the matmul peak, timed in the same rounds.
  moe        the MoE layer (router, dispatch, experts, combine) vs a dense SwiGLU MLP with the
             same active FLOPs, forward + backward; transformers' MoE layer on the same weights.
  gpu        (CUDA only; with decode, the default there) the bf16 training step (autocast, fp32 parameters) of the
             small and gpu presets: k2 eager and torch.compile'd vs transformers, tokens/s, MFU against
             the honest peak (k2cli.train.mfu: datasheet dense bf16, the same figure the training loop
             logs), and the max-logit statistic's share of the step.

--quick is a smoke run (tiny preset, small shapes, few repeats) that prints and writes nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RESULTS, load_average, matmul_peak_fn, sync, time_interleaved, time_one, time_pair, write_section,
)

from k2cli.data.packing import PackedData  # noqa: E402
from k2cli.model.attention import per_head_max_logit  # noqa: E402
from k2cli.model.config import ModelConfig  # noqa: E402
from k2cli.model.generate import generate  # noqa: E402
from k2cli.model.hf import write_hf_dir  # noqa: E402
from k2cli.model.io import state_dict_for_saving  # noqa: E402
from k2cli.model.moe import DenseMLP, update_router_biases  # noqa: E402
from k2cli.model.precision import compute_dtype  # noqa: E402
from k2cli.model.transformer import build_model  # noqa: E402
from k2cli.optim.muon import OptimConfig, build_optimizer, orthogonalize  # noqa: E402
from k2cli.train.lm_task import LMTask  # noqa: E402
from k2cli.train.mfu import device_peak, mfu  # noqa: E402

SECTIONS = ("train", "breakdown", "decode", "mfu", "moe", "gpu")
# Defaults: a CPU runs the float32 sections (their MFU is against a float32 matmul timed in the same
# rounds); CUDA runs the bf16 training section (MFU against k2cli.train.mfu's peak) and decoding.
CPU_SECTIONS = ("train", "breakdown", "decode", "mfu", "moe")
CUDA_SECTIONS = ("gpu", "decode")


# ----------------------------------------------------------------------------- setup


def load_pair(preset: str, device: str):
    """A k2 model and transformers' DeepseekV3ForCausalLM loaded from k2's own HF export."""
    import transformers

    cfg = ModelConfig.from_preset(preset)
    model = build_model(cfg, seed=0).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_dir(state_dict_for_saving(model), cfg, Path(tmp))
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, attn_implementation="sdpa", experts_implementation="grouped_mm"
        ).to(device)
    return cfg, model, hf


def k2_train_step(model, inputs, targets):
    """forward + backward as the training loop does it (statistic and balance loss included)."""
    logits, stats = model(inputs, stats=True, max_logits=True)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + 1e-4 * stats.balance_loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return stats


def hf_train_step(hf, inputs, targets):
    logits = hf(inputs).logits
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    hf.zero_grad(set_to_none=True)


def train_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """Training FLOPs per token: `k2 model info`'s count (6 x active matmul parameters + attention),
    with the attention square halved for the causal mask — the work a causal kernel must do."""
    f = cfg.flops_per_token(seq)
    attention = 2 * seq * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers
    return f["train"] - 3 * attention / 2


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:,.1f}"


# ----------------------------------------------------------------------------- 1. training throughput


def bench_train(preset: str, batch: int, seq: int, repeats: int, device: str) -> dict:
    cfg, model, hf = load_pair(preset, device)
    model.train(), hf.train()
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    inputs, targets = x[:, :-1], x[:, 1:]
    peak, peak_flops = matmul_peak_fn(device)  # MFU's yardstick, timed in the same rounds
    t = time_interleaved({"k2": lambda: k2_train_step(model, inputs, targets), "hf": lambda: hf_train_step(hf, inputs, targets),
                          "peak": peak}, repeats, warmup=2)
    t_k2, t_hf = t["k2"], t["hf"]
    tokens = batch * seq
    flops = train_flops_per_token(cfg, seq) * tokens
    return {"preset": preset, "shape": f"{batch}x{seq}", "k2": tokens / t_k2, "hf": tokens / t_hf, "ratio": t_hf / t_k2,
            "t_k2": t_k2, "t_hf": t_hf, "flops": flops, "tokens": tokens, "peak": peak_flops / t["peak"]}


# ----------------------------------------------------------------------------- 2. training-step breakdown


def bench_breakdown(preset: str, micro: int, seq: int, global_batch: int, repeats: int, device: str) -> dict:
    """Time each part of one MuonClip step; forward/backward measured on one micro-batch and
    multiplied by the micro-batches of the recipe's global batch (gradient accumulation)."""
    cfg = ModelConfig.from_preset(preset)
    model = build_model(cfg, seed=0).to(device).train()
    optimizer = build_optimizer(model, OptimConfig(name="muonclip"))
    rows = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(max(4 * global_batch, 64), seq + 1), dtype=np.int32)
    task = LMTask(PackedData(rows), None, batch_size=global_batch, seed=0)
    n_micro = global_batch // micro
    step = [0]

    def data():
        step[0] += 1
        return task.batch(step[0])  # the global batch of one optimizer step

    micro_batch = {k: v[:micro].to(device) for k, v in data().items()}

    def forward(track: bool):
        loss, _, stats = task.loss(model, micro_batch, track)
        return loss / micro_batch["targets"].numel() + 1e-4 * stats.balance_loss, stats

    def fwd_bwd():  # returns (forward s, backward s)
        sync()
        t0 = time.perf_counter()
        loss, stats = forward(True)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        return t1 - t0, time.perf_counter() - t1, stats

    fwd_bwd()  # warm-up, and gradients for the optimizer parts below
    peak, peak_flops = matmul_peak_fn(device)
    fw, bw, pk = [], [], []
    for _ in range(repeats):  # the matmul peak in the same rounds, for the step's MFU
        model.zero_grad(set_to_none=True)
        f, b, stats = fwd_bwd()
        fw.append(f), bw.append(b), pk.append(time_one(peak, 1, warmup=0))
    max_logits, loads = stats.max_logits, stats.expert_counts.float()

    # the statistic inside k2's forward: forward with it minus forward without, interleaved
    with torch.no_grad():
        t_track, t_plain = time_pair(lambda: forward(True), lambda: forward(False), repeats)
    # ... and what it costs as a separate pass (the path beside a fused attention kernel, e.g. CUDA)
    qk = []
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, kw, out: qk.append(a), with_kwargs=True)
             for layer in model.layers]
    with torch.no_grad():
        forward(False)
    for h in hooks:
        h.remove()
    qs = []
    with torch.no_grad():
        for layer, args in zip(model.layers, qk):
            attn = layer.self_attn
            hidden, cos, sin = args[:3]
            qs.append(_attention_qk(attn, hidden, cos, sin))
    t_separate = time_one(lambda: [per_head_max_logit(q, k, a.softmax_scale) for (q, k), a in
                                   zip(qs, model.attention_layers())], repeats)

    grads = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}

    def restore_grads():
        for p, g in grads.items():
            p.grad = g.clone()

    def clip():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    def opt_step():
        optimizer.step()

    def ns_only():  # Newton-Schulz alone, on every Muon matrix (batched as the optimizer does)
        g = next(g for g in optimizer.param_groups if g["kind"] == "muon")
        orthogonalize([p.grad.reshape(-1, A, B) for p, (A, B) in zip(g["params"], g["matrix_shapes"])], g["ns_steps"])

    restore_grads()
    t_data = time_one(data, repeats * 2)
    t_clip = time_one(lambda: (restore_grads(), clip()), repeats) - time_one(restore_grads, repeats)
    t_opt = time_one(lambda: (restore_grads(), opt_step()), repeats, warmup=1) - time_one(restore_grads, repeats)
    t_ns = time_one(ns_only, repeats, warmup=0)
    over = torch.full_like(max_logits, 1.01 * optimizer.cfg.qk_clip_tau)
    t_qkclip = time_one(lambda: optimizer.clip_qk(over), repeats)  # every head clipped: the worst case
    t_bias = time_one(lambda: update_router_biases(model.routers(), loads, 1e-3), repeats)

    t_fwd, t_bwd = float(np.median(fw)), float(np.median(bw))
    t_stat = t_track - t_plain  # signed: at the noise level
    parts = {
        "data loading (global batch)": t_data,
        f"forward x {n_micro} micro-batches (statistic included)": t_fwd * n_micro,
        f"backward x {n_micro}": t_bwd * n_micro,
        "gradient clipping": max(t_clip, 0.0),
        "optimizer step (Muon: momentum + Newton-Schulz + update; AdamW)": t_opt,
        "QK-Clip (all heads clipped)": t_qkclip,
        "router-bias update (aux-loss-free)": t_bias,
    }
    total = sum(parts.values())
    tokens_per_micro = micro * seq
    # tokens per step at which optimizer + QK-Clip + statistic are 10% of the step
    per_token = (t_fwd + t_bwd) / tokens_per_micro
    fixed = t_opt + t_qkclip
    breakeven = 9 * fixed / per_token if per_token > 0 else float("nan")
    return {"preset": preset, "micro": micro, "seq": seq, "global": global_batch, "n_micro": n_micro, "parts": parts,
            "total": total, "t_ns": t_ns, "t_stat": t_stat, "t_stat_separate": t_separate * n_micro, "t_fwd": t_fwd,
            "t_bwd": t_bwd, "t_opt": t_opt, "t_qkclip": t_qkclip, "breakeven_tokens": breakeven,
            "flops_step": train_flops_per_token(model.config, seq) * global_batch * seq,
            "peak": peak_flops / float(np.median(pk))}


def _attention_qk(attn, x, cos, sin):
    """The full queries and keys [B, H, T, dn+dr] one MLA layer attends with (as in its forward)."""
    from k2cli.model.rope import apply_rope

    B, T, _ = x.shape
    H, dn, dr = attn.n_heads, attn.dn, attn.dr
    q = attn.queries(x).view(B, T, H, dn + dr).transpose(1, 2)
    q_nope, q_rope = q.split([dn, dr], dim=-1)
    latent, k_rope = attn.kv_a_proj_with_mqa(x).split([attn.r, dr], dim=-1)
    kv = attn.kv_b_proj(attn.kv_a_layernorm(latent)).view(B, T, H, dn + attn.dv).transpose(1, 2)
    k_rope = apply_rope(k_rope, cos, sin)
    k = torch.cat((kv[..., :dn], k_rope[:, None].expand(B, H, T, dr)), dim=-1)
    return torch.cat((q_nope, apply_rope(q_rope, cos[:, None], sin[:, None])), dim=-1), k


# ----------------------------------------------------------------------------- 3. decoding


def bench_decode(preset: str, batch: int, prompt: int, new: int, repeats: int, device: str) -> dict:
    """Two interleaved timings per side: the prompt plus 1 new token (prefill), and plus `new`
    tokens; their difference is the decoding phase."""
    cfg, model, hf = load_pair(preset, device)
    model.eval(), hf.eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=g).to(device)
    as_lists = prompts.tolist()

    def k2_decode(n):
        return lambda: generate(model, as_lists, max_new_tokens=n)

    def hf_decode(n):
        def run():
            with torch.no_grad():
                hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)
        return run

    k2_1, hf_1 = time_pair(k2_decode(1), hf_decode(1), repeats, warmup=1)
    k2_n, hf_n = time_pair(k2_decode(new), hf_decode(new), repeats, warmup=1)
    steps = batch * (new - 1)  # tokens made by the decoding phase
    return {"preset": preset, "batch": batch, "prompt": prompt, "new": new,
            "prefill_k2": k2_1, "prefill_hf": hf_1,
            "k2": steps / max(k2_n - k2_1, 1e-9), "hf": steps / max(hf_n - hf_1, 1e-9),
            "ratio": (hf_n - hf_1) / max(k2_n - k2_1, 1e-9),
            "total_k2": batch * new / k2_n, "total_hf": batch * new / hf_n, "total_ratio": hf_n / k2_n}


# ----------------------------------------------------------------------------- 5. MoE dispatch


def bench_moe(preset: str, batch: int, seq: int, repeats: int, device: str) -> dict:
    cfg, model, hf = load_pair(preset, device)
    i = cfg.first_k_dense_replace  # the first MoE layer
    moe, hf_moe = model.layers[i].mlp, hf.model.layers[i].mlp
    width = (cfg.num_experts_per_tok + cfg.n_shared_experts) * cfg.moe_intermediate_size
    dense = DenseMLP(cfg.hidden_size, width).to(device)
    x = (torch.randn(batch, seq, cfg.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.5).to(device)
    x.requires_grad_(True)
    grad = torch.randn_like(x)

    def run(layer, k2_moe=False):
        def f():
            y = layer(x, stats=True)[0] if k2_moe else layer(x)  # k2's MoE also returns loads and balance loss
            y.backward(grad)
            x.grad = None
            layer.zero_grad(set_to_none=True)
        return f

    t_moe, t_dense = time_pair(run(moe, k2_moe=True), run(dense), repeats)
    t_hf = time_one(run(hf_moe), repeats)
    return {"preset": preset, "shape": f"{batch}x{seq}", "moe": t_moe, "dense": t_dense, "hf": t_hf, "width": width}


# ----------------------------------------------------------------------------- 6. GPU: bf16 training step


def bench_gpu(preset: str, batch: int, seq: int, repeats: int, device: str = "cuda", dtype=torch.bfloat16,
              compile: bool = True) -> dict:
    """One bf16 training step (forward + backward, autocast over fp32 parameters as the loop's
    precision=auto does), timed interleaved:
      k2        the default path: Triton flash attention (the statistic for free) when triton imports
      k2_plain  no statistic, PyTorch's fused attention (sdpa): the cheapest step without it
      k2_sdpa   sdpa + the statistic as a separate pass (k2 before the Triton kernel)
      k2_compiled  torch.compile(k2), statistic on
      hf        transformers' DeepseekV3 on the same weights (sdpa, grouped_mm experts)
    """
    from k2cli.model import attention
    from k2cli.model.triton_attention import available as triton_available

    cfg, model, hf = load_pair(preset, device)
    model.train(), hf.train()
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    inputs, targets = x[:, :-1], x[:, 1:]
    kind = torch.device(device).type
    amp = lambda: torch.autocast(kind, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731

    def k2_step(m, track, backend="auto"):
        def run():  # k2's explicit precision policy (model/precision.py): weights cast at use, no autocast
            attention.ATTENTION_BACKEND = backend
            with compute_dtype(model, dtype):
                logits, stats = m(inputs, stats=True, max_logits=track)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()) + 1e-4 * stats.balance_loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            attention.ATTENTION_BACKEND = "auto"
        return run

    def hf_step():
        with amp():
            logits = hf(inputs).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        hf.zero_grad(set_to_none=True)

    fns = {"k2": k2_step(model, True), "k2_plain": k2_step(model, False, "sdpa"),
           "k2_sdpa": k2_step(model, True, "sdpa"), "hf": hf_step}
    compiled, t_compile, compile_error = torch.compile(model), float("nan"), "not asked"
    try:
        if not compile:
            raise RuntimeError("not asked")
        sync()
        t0 = time.perf_counter()
        k2_step(compiled, True)()  # the first call compiles
        sync()
        t_compile = time.perf_counter() - t0
        fns["k2_compiled"] = k2_step(compiled, True)
    except Exception as e:  # reported in the table, not hidden: the other columns still mean something
        compile_error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    t = time_interleaved(fns, repeats, warmup=2)
    tokens = batch * seq
    peak = device_peak(device)
    per_token = cfg.flops_per_token(seq)["train"]  # the training loop's convention (full attention square)
    row = {"preset": preset, "shape": f"{batch}x{seq}", "tokens": tokens, "peak": str(peak), "triton": triton_available(),
           "t_compile": t_compile, "compile_error": compile_error,
           "memory_gib": torch.cuda.max_memory_allocated() / 2**30 if kind == "cuda" else float("nan")}
    for name, sec in t.items():
        row[f"tps_{name}"] = tokens / sec
        row[f"mfu_{name}"] = mfu(tokens / sec, per_token, peak.tflops)
    row["stat_share"] = (t["k2"] - t["k2_plain"]) / t["k2"]  # what the statistic (and its kernel) costs
    row["stat_share_sdpa"] = (t["k2_sdpa"] - t["k2_plain"]) / t["k2_sdpa"]
    row["ratio_hf"] = t["hf"] / t["k2"]
    if "k2_compiled" in t:
        row["ratio_hf_compiled"] = t["hf"] / t["k2_compiled"]
    del model, hf, compiled
    if kind == "cuda":
        torch.cuda.empty_cache()
    return row


def gpu_table(rows) -> str:
    lines = ["| preset | shape | k2 tokens/s (MFU) | k2 compiled | transformers | k2 / transformers | compiled / "
             "transformers | statistic's share: Triton / sdpa + pass | compile s | peak memory |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        comp = (f"{r['tps_k2_compiled']:,.0f} ({100 * r['mfu_k2_compiled']:.1f}%)" if "tps_k2_compiled" in r
                else f"failed: {r['compile_error']}")
        lines.append(
            f"| {r['preset']} | {r['shape']} | {r['tps_k2']:,.0f} ({100 * r['mfu_k2']:.1f}%) | {comp} | "
            f"{r['tps_hf']:,.0f} ({100 * r['mfu_hf']:.1f}%) | **{r['ratio_hf']:.2f}x** | "
            f"{r.get('ratio_hf_compiled', float('nan')):.2f}x | {100 * r['stat_share']:.1f}% / "
            f"{100 * r['stat_share_sdpa']:.1f}% | {r['t_compile']:.0f} | {r['memory_gib']:.1f} GiB |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- tables


def table(rows, unit):
    lines = [f"| preset | shape | k2 {unit} | transformers {unit} | k2 / transformers |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['shape']} | {r['k2']:,.0f} | {r['hf']:,.0f} | **{r['ratio']:.2f}x** |")
    return "\n".join(lines)


def breakdown_table(b: dict) -> str:
    lines = ["| part | ms per step | share |", "|---|---:|---:|"]
    for name, t in b["parts"].items():
        lines.append(f"| {name} | {fmt_ms(t)} | {100 * t / b['total']:.1f}% |")
    lines.append(f"| **whole step** | **{fmt_ms(b['total'])}** | 100% |")
    share = (b["t_opt"] + b["t_qkclip"] + max(b["t_stat"], 0.0) * b["n_micro"]) / b["total"]
    return "\n".join(lines), share


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="tiny,small", help="for the train, decode and moe sections")
    ap.add_argument("--gpu-presets", default="small,gpu", help="for the gpu section")
    ap.add_argument("--sections", default=None,
                    help=f"comma-separated, from {','.join(SECTIONS)} (default: {','.join(CPU_SECTIONS)} on a CPU, "
                         f"{','.join(CUDA_SECTIONS)} on CUDA)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny preset, small shapes, few repeats; writes nothing")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a machine shared with other jobs, multi-threaded kernels stall on "
                         "preempted threads and the ratios swing; 0: torch's default, all cores)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(RESULTS), help="the results file (its section is replaced)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    default = CUDA_SECTIONS if args.device.startswith("cuda") else CPU_SECTIONS
    sections = [s for s in (args.sections or ",".join(default)).split(",") if s]
    for s in sections:
        if s not in SECTIONS:
            ap.error(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
    quick = args.quick
    presets = ["tiny"] if quick else args.presets.split(",")
    reps = 2 if quick else 7
    load_before = load_average()
    t_begin = time.perf_counter()
    out = []

    def say(x):
        print(x, flush=True)

    train_rows = []
    if "train" in sections or "mfu" in sections:
        shapes = {"tiny": (8, 256), "small": (4, 256)} if not quick else {"tiny": (2, 64)}
        for preset in presets:
            b, t = shapes[preset]
            train_rows.append(bench_train(preset, b, t, reps if preset == "tiny" else max(2, reps - 2), args.device))
            say(train_rows[-1])
    if "train" in sections:
        out.append(
            "### Training throughput: forward + backward\n\n"
            "k2 also computes the per-head max-logit statistic and the MoE balance loss; transformers runs with sdpa "
            "attention and grouped_mm experts. Same exported weights, same batch, float32.\n\n" + table(train_rows, "tokens/s"))

    if "breakdown" in sections:
        if quick:
            b = bench_breakdown("tiny", micro=2, seq=64, global_batch=4, repeats=2, device=args.device)
        else:
            b = bench_breakdown("small", micro=2, seq=1024, global_batch=64, repeats=3, device=args.device)
        say({k: v for k, v in b.items() if k != "parts"})
        tbl, share = breakdown_table(b)
        tokens = b["global"] * b["seq"]
        out.append(
            f"### One training step, part by part ({b['preset']} recipe: {b['global']} x {b['seq']} tokens, MuonClip)\n\n"
            f"Forward and backward are measured on one micro-batch of {b['micro']} x {b['seq']} and multiplied by the "
            f"{b['n_micro']} micro-batches of gradient accumulation (what a CPU runs; a GPU takes larger micro-batches, "
            "same FLOPs per token). The optimizer, QK-Clip and the bias update run once per step.\n\n" + tbl + "\n\n"
            f"- **Optimizer + QK-Clip + max-logit statistic: {100 * share:.1f}% of the step** (target at most 10%). "
            f"Newton-Schulz alone (all Muon matrices, batched by shape): {fmt_ms(b['t_ns'])} ms.\n"
            f"- The max-logit statistic is free inside k2's forward on CPU: the blocked attention's softmax row maxima *are* "
            f"the statistic (forward with it minus forward without: {fmt_ms(b['t_stat'])} ms per micro-batch, noise). As a "
            f"separate pass beside a fused attention kernel (the CUDA path) it costs {fmt_ms(b['t_stat_separate'])} ms per "
            "step.\n"
            f"- The optimizer's cost is per step, forward/backward's per token: optimizer + QK-Clip stay under 10% of the step "
            f"from {b['breakeven_tokens']:,.0f} tokens per step on (the recipe has {tokens:,}; Moonlight reports 1-3% at "
            "millions of tokens per step).")

    if "mfu" in sections:
        lines = ["| preset | shape | training FLOPs / token | matmul peak | k2 forward+backward | transformers forward+backward |",
                 "|---|---|---:|---:|---:|---:|"]
        for r in train_rows:
            k2_mfu = r["flops"] / r["t_k2"] / r["peak"]
            hf_mfu = r["flops"] / r["t_hf"] / r["peak"]
            lines.append(f"| {r['preset']} | {r['shape']} | {r['flops'] / r['tokens'] / 1e6:,.1f}M | "
                         f"{r['peak'] / 1e9:,.0f} GFLOP/s | **{100 * k2_mfu:.0f}%** | {100 * hf_mfu:.0f}% |")
        extra = ""
        if "breakdown" in sections and not quick:
            step_mfu = b["flops_step"] / b["total"] / b["peak"]
            extra = (f"\n\nWhole training step of the small recipe (forward, backward, optimizer and all, from the breakdown "
                     f"above; matmul peak {b['peak'] / 1e9:,.0f} GFLOP/s in those rounds): **{100 * step_mfu:.0f}% MFU**. "
                     "On a GPU (bf16, `torch.compile`) the issue's target is 35% on one H100; this run has no GPU.")
        out.append(
            "### Model FLOPs utilisation\n\nAgainst the machine's matmul peak measured in the same rounds as the work (a "
            "float32 2048^3 matmul timed between the training steps, so both see the same load). FLOPs per token: "
            "6 x active matmul parameters + causal attention (half of `k2 model info`'s full square).\n\n" + "\n".join(lines) + extra)

    if "decode" in sections:
        lines = ["| preset | batch | prefill (prompt + 1 token) k2 / transformers | decoding new tokens/s k2 | "
                 "transformers | **k2 / transformers** | whole call (prompt + new) k2 / transformers |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        prompt, new = (64, 8) if quick else (512, 32)
        for preset in presets:
            for batch in (1, 16):
                reps_d = 1 if quick or (preset != "tiny" and batch > 1) else 2
                d = bench_decode(preset, batch, prompt, new, reps_d, args.device)
                say(d)
                lines.append(f"| {preset} | {batch} | {fmt_ms(d['prefill_k2'])} ms / {fmt_ms(d['prefill_hf'])} ms = "
                             f"{d['prefill_hf'] / d['prefill_k2']:.2f}x | {d['k2']:,.0f} | {d['hf']:,.0f} | "
                             f"**{d['ratio']:.2f}x** | {d['total_ratio']:.2f}x |")
        out.append(
            f"### Greedy decoding (prompt {prompt}, {new} new tokens)\n\nk2: `generate` with the MLA latent cache (the prompt "
            "prefilled in the expanded form; then absorbed up-projections, multi-query attention over the latent). "
            "transformers: `generate()` with its KV cache. Each side is timed for the prompt plus 1 new token (prefill) and "
            f"plus {new}; the difference is the decoding phase, whose tokens/s is the headline. The whole-call ratio "
            "includes the prefill, which is matmul-bound on both sides (the same FLOPs).\n\n" + "\n".join(lines))

    if "moe" in sections:
        lines = ["| preset | tokens | MoE layer (k2) | dense SwiGLU, same active FLOPs | MoE / dense | transformers' MoE layer |",
                 "|---|---|---:|---:|---:|---:|"]
        for preset in presets:
            b_, t_ = (4, 256) if not quick else (2, 64)
            m = bench_moe(preset, b_, t_, reps, args.device)
            say(m)
            lines.append(f"| {preset} | {m['shape']} | {fmt_ms(m['moe'])} ms | {fmt_ms(m['dense'])} ms (width {m['width']}) | "
                         f"**{m['moe'] / m['dense']:.2f}x** | {fmt_ms(m['hf'])} ms |")
        out.append(
            "### MoE dispatch efficiency (forward + backward)\n\nOne MoE layer (router, sort by expert, grouped matmuls, "
            "scatter-add combine, shared expert) against a dense SwiGLU MLP as wide as the active experts "
            "((top-k + shared) x expert width): 1.00x would be a free dispatch.\n\n" + "\n".join(lines))

    if "gpu" in sections:
        if not args.device.startswith("cuda"):
            out.append("### GPU: bf16 training step\n\nSkipped: no CUDA device (this section measures only on a GPU).")
        else:
            shapes = {"tiny": (16, 256), "small": (16, 1024), "gpu": (8, 2048)}
            rows = []
            for preset in (["small"] if quick else args.gpu_presets.split(",")):
                b_, t_ = (4, 256) if quick else shapes.get(preset, (8, 1024))
                rows.append(bench_gpu(preset, b_, t_, 2 if quick else 5, args.device))
                say(rows[-1])
            out.append(
                "### GPU: bf16 training step (forward + backward), k2 vs transformers\n\n"
                "Autocast bf16 over fp32 parameters (the training loop's precision=auto), same exported weights, "
                "median of interleaved rounds. MFU = tokens/s x training FLOPs per token (`k2 model info`: 6 x active "
                f"matmul parameters + the full attention square) / the peak ({rows[0]['peak']}; the figure the "
                "training loop logs against). k2 computes the max-logit statistic (QK-Clip) and the balance loss; "
                "its share is the step with it (Triton flash attention) against the step without it (sdpa), and "
                "the same for the old path (sdpa + a separate statistic pass). Triton installed: "
                f"{rows[0]['triton']}.\n\n" + gpu_table(rows))

    wall = time.perf_counter() - t_begin
    body = ("## Model: k2 vs transformers DeepseekV3 (same exported weights), and vs the machine's matmul peak\n\n"
            + "\n\n".join(out)
            + f"\n\nLoad average (1 min) of the machine, shared with other jobs: {load_before} before, {load_average()} after; "
              f"this run took {wall / 60:.1f} min.")
    print(body)
    if not (args.no_write or quick):
        write_section(f"bench_model_{args.device}", body, Path(args.out))


if __name__ == "__main__":
    main()
