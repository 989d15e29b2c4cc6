"""k2 vs Hugging Face transformers' DeepseekV3 on the same weights, side by side.

    python benchmarks/bench_model.py [--presets tiny,small] [--quick]

1. Training throughput: forward + backward tokens/s. k2 also computes what training needs
   and transformers does not: the per-head max-logit statistic (QK-Clip's input) and the
   MoE balance loss. transformers runs with its fastest settings: sdpa attention and
   grouped_mm experts.
2. Decoding throughput: k2's latent-cache generation vs `generate()`, greedy, same prompts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import time_pair, write_section  # noqa: E402

from k2cli.model.config import ModelConfig  # noqa: E402
from k2cli.model.generate import generate  # noqa: E402
from k2cli.model.hf import write_hf_dir  # noqa: E402
from k2cli.model.io import state_dict_for_saving  # noqa: E402
from k2cli.model.transformer import ForwardStats, build_model  # noqa: E402


def load_pair(preset: str, device: str):
    import transformers

    cfg = ModelConfig.from_preset(preset)
    model = build_model(cfg, seed=0).to(device)
    tmp = tempfile.mkdtemp()
    write_hf_dir(state_dict_for_saving(model), cfg, Path(tmp))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp, attn_implementation="sdpa", experts_implementation="grouped_mm"
    ).to(device)
    return cfg, model, hf


def bench_train(preset: str, batch: int, seq: int, repeats: int, device: str) -> dict:
    cfg, model, hf = load_pair(preset, device)
    model.train(), hf.train()
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]

    def k2_step():
        stats = ForwardStats(track_max_logits=True)
        logits = model(inputs, stats=stats)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + 1e-3 * stats.balance_loss()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def hf_step():
        logits = hf(inputs).logits
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        hf.zero_grad(set_to_none=True)

    t_k2, t_hf = time_pair(k2_step, hf_step, repeats)
    tokens = batch * seq
    return {"preset": preset, "shape": f"{batch}x{seq}", "k2": tokens / t_k2, "hf": tokens / t_hf, "ratio": t_hf / t_k2}


def bench_decode(preset: str, batch: int, prompt: int, new: int, repeats: int, device: str) -> dict:
    cfg, model, hf = load_pair(preset, device)
    model.eval(), hf.eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=g).to(device)
    as_lists = prompts.tolist()

    def k2_decode():
        generate(model, as_lists, max_new_tokens=new)

    def hf_decode():
        with torch.no_grad():
            hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)

    t_k2, t_hf = time_pair(k2_decode, hf_decode, repeats, warmup=1)
    tokens = batch * new
    return {"preset": preset, "shape": f"batch {batch}, prompt {prompt}, +{new}", "k2": tokens / t_k2, "hf": tokens / t_hf,
            "ratio": t_hf / t_k2}


def table(rows, unit):
    lines = [f"| preset | shape | k2 {unit} | transformers {unit} | k2 / transformers |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['shape']} | {r['k2']:,.0f} | {r['hf']:,.0f} | **{r['ratio']:.2f}x** |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    reps = 3 if args.quick else 10
    train_shapes = {"tiny": (8, 256), "small": (4, 256)}
    train_rows, decode_rows = [], []
    for preset in args.presets.split(","):
        b, t = train_shapes[preset]
        train_rows.append(bench_train(preset, b, t, reps, args.device))
        print(train_rows[-1], flush=True)
        for batch in (1, 16):
            decode_rows.append(bench_decode(preset, batch, 512, 32, max(2, reps // 3), args.device))
            print(decode_rows[-1], flush=True)
    body = (
        "## Model: k2 vs transformers DeepseekV3 (same exported weights)\n\n"
        "Training step, forward + backward (k2 also computes the per-head max-logit statistic and the MoE balance loss; "
        "transformers uses sdpa attention and grouped_mm experts):\n\n"
        + table(train_rows, "tokens/s")
        + "\n\nGreedy decoding (k2: MLA latent cache with absorbed up-projections; transformers: `generate`):\n\n"
        + table(decode_rows, "new tokens/s")
    )
    print(body)
    if not args.no_write:
        write_section(f"bench_model_{args.device}", body)


if __name__ == "__main__":
    main()
