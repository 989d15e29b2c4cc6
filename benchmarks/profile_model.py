"""Where the time goes: torch.profiler over k2's hot paths, top operators and their shares.

    python benchmarks/profile_model.py [--threads 1] [--label after] [--write]

Profiles (CPU, float32):
  train-tiny   forward + backward of the tiny preset, 8 x 256, with the max-logit statistic
  train-small  the same for the small preset, 4 x 256
  optim-small  one MuonClip optimizer step of the small preset (Newton-Schulz for all Muon matrices)
  decode-tiny  `generate`, batch 1, prompt 512, 32 new tokens

Only public APIs are used (build_model, model(..., stats=True), generate, build_optimizer), so the same
script profiles an older checkout: `PYTHONPATH=<old checkout>/src python benchmarks/profile_model.py
--label before --write` records the "before" next to the "after". With --write each label is a
section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import load_average, write_section  # noqa: E402

from k2cli.model.config import ModelConfig  # noqa: E402
from k2cli.model.generate import generate  # noqa: E402
from k2cli.model.transformer import build_model  # noqa: E402
from k2cli.optim.muon import OptimConfig, build_optimizer  # noqa: E402

# Operator families for the summary line.
FAMILIES = {
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::baddbmm_", "aten::_grouped_mm"),
    "fused attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                        "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "copies and fills": ("aten::copy_", "aten::fill_", "aten::cat", "aten::index_select", "aten::index", "aten::zero_",
                         "aten::index_add_", "aten::scatter_add_", "aten::_index_put_impl_", "aten::clone"),
}


def workloads():
    def train(preset, batch, seq):
        cfg = ModelConfig.from_preset(preset)
        model = build_model(cfg, seed=0).train()
        x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))

        def step():
            logits, stats = model(x[:, :-1], stats=True, max_logits=True)
            loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) + 1e-4 * stats.balance_loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        return step

    def optim(preset):
        model = build_model(ModelConfig.from_preset(preset), seed=0)
        opt = build_optimizer(model, OptimConfig(name="muonclip"))
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        return opt.step

    def decode(preset, batch, prompt, new):
        cfg = ModelConfig.from_preset(preset)
        model = build_model(cfg, seed=0).eval()
        prompts = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0)).tolist()
        return lambda: generate(model, prompts, max_new_tokens=new)

    return {
        "train-tiny (8 x 256, forward + backward)": lambda: train("tiny", 8, 256),
        "train-small (4 x 256, forward + backward)": lambda: train("small", 4, 256),
        "optim-small (one MuonClip step)": lambda: optim("small"),
        "decode-tiny (batch 1, prompt 512, +32)": lambda: decode("tiny", 1, 512, 32),
    }


def top_ops(fn, top: int):
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)  # microseconds
    families = defaultdict(float)
    for e in events:
        fam = next((f for f, names in FAMILIES.items() if e.key in names), "other (elementwise, softmax, ...)")
        families[fam] += e.self_cpu_time_total
    events.sort(key=lambda e: -e.self_cpu_time_total)
    rows = [(e.key, e.self_cpu_time_total / 1e3, 100 * e.self_cpu_time_total / total, e.count) for e in events[:top]]
    return total / 1e3, rows, {f: 100 * t / total for f, t in sorted(families.items(), key=lambda kv: -kv[1])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: shares that do not depend on other jobs' load)")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--only", default="", help="comma-separated prefixes of the profiles to run")
    ap.add_argument("--label", default="after")
    ap.add_argument("--write", action="store_true", help="write the section profile_<label> of benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()
    parts = []
    for name, make in workloads().items():
        if args.only and not any(name.startswith(p) for p in args.only.split(",")):
            continue
        total, rows, fams = top_ops(make(), args.top)
        lines = [f"**{name}**: {total:,.0f} ms of operator time; "
                 + ", ".join(f"{f} {s:.0f}%" for f, s in fams.items()), "",
                 "| operator | ms | share | calls |", "|---|---:|---:|---:|"]
        lines += [f"| `{k}` | {ms:,.1f} | {share:.1f}% | {n} |" for k, ms, share, n in rows]
        parts.append("\n".join(lines))
        print(parts[-1] + "\n", flush=True)
    body = (f"## Profile ({args.label})\n\ntorch.profiler, self CPU time per operator, {args.threads} thread(s). "
            f"Load average of the shared machine: {load_before} before, {load_average()} after (absolute times "
            "move with it; the shares are what to read).\n\n" + "\n\n".join(parts))
    if args.write:
        write_section(f"profile_{args.label.split()[0]}", body)


if __name__ == "__main__":
    main()
