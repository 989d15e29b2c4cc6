"""The GPU side: the `gpu` preset and recipes, benchmarks/gpu_check.sh's control flow (CPU), and
CUDA-only checks (marked `gpu`, skipped without CUDA; `benchmarks/gpu_check.sh` runs `pytest -m gpu`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from k2cli.model.config import ModelConfig
from k2cli.recipes import resolve_recipe

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def recipe_class(stage: str):
    """The recipe dataclass of a chain stage, by its recipe file name."""
    from k2cli.stages import agentic, eval, extend_context, pretrain, rephrase, rl, sft, synth

    return {"synth": synth.SynthRecipe, "rephrase": rephrase.RephraseRecipe, "pretrain": pretrain.PretrainRecipe,
            "midtrain": pretrain.PretrainRecipe, "extend_context": extend_context.ExtendRecipe,
            "agentic": agentic.AgenticRecipe, "sft": sft.SFTRecipe, "rl": rl.RLRecipe, "eval": eval.EvalRecipe}[stage]


# ----------------------------------------------------------------------------- the gpu preset and recipes


def test_model_info_gpu_preset(k2):
    out = k2("model", "info", "--preset", "gpu", "--json").output
    assert '"total"' in out and "1886602752" in out.replace(",", "").replace(" ", "")


def test_gpu_preset_is_k2_shaped():
    c = ModelConfig.from_preset("gpu").validate()
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (128, 64, 128)  # K2's heads
    assert c.n_routed_experts >= 64 and 6 <= c.num_experts_per_tok <= 8
    assert c.n_shared_experts == 1 and c.first_k_dense_replace == 1 and c.q_lora_rank > 0
    assert 1024 <= c.hidden_size <= 2048


def test_gpu_recipes_cover_the_chain_and_resolve():
    small = sorted(p.name for p in (ROOT / "recipes" / "small").glob("*.toml"))
    gpu = sorted(p.name for p in (ROOT / "recipes" / "gpu").glob("*.toml"))
    assert gpu == small  # `make pipeline PRESET=gpu` finds every stage's recipe
    for path in (ROOT / "recipes" / "gpu").glob("*.toml"):
        recipe, _ = resolve_recipe(recipe_class(path.stem), path.stem, recipe_file=str(path))
        if path.stem == "pretrain":
            assert recipe.model.name == "gpu"
        train = getattr(recipe, "train", None)
        if train is not None:
            train.validate()


# ----------------------------------------------------------------------------- gpu_check.sh on a CPU


def run_check(tmp_path, *args, env=None, budget=30):
    out = tmp_path / "results.md"
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), "--budget", str(budget), "--out", str(out), *args], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=budget + 30)
    return proc, out.read_text() if out.exists() else "", time.monotonic() - t0


def steps(results: str) -> dict:
    """step name -> (status, command) from the results table."""
    rows = re.findall(r"^\| ([\w-]+) \| ([^|]+) \| \d+ \| \d+ \| `(.*)` \|$", results, re.M)
    return {name: (status.strip(), cmd) for name, status, cmd in rows}


def test_check_without_cuda_skips_gpu_steps_and_writes_results(tmp_path):
    """On a CPU: the env step runs, every GPU step is recorded as skipped with its command, and each
    chain command's recipe and --set overrides resolve (what would break first on the GPU machine)."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real check")
    proc, results, wall = run_check(tmp_path, budget=40, env={"PYTHON": sys.executable})
    s = steps(results)
    assert proc.returncode == (0 if s["deps"][0] == "ok" else 1), (proc.stderr, results)
    s = steps(results)
    assert list(s) == ["env", "deps", "pytest", "bench-small", "bench-gpu", "synth", "rephrase", "pretrain", "midtrain",
                       "extend-context", "agentic", "sft", "rl", "eval", "report"]
    assert s["env"][0] == "ok"
    assert s["deps"][0] in ("ok", "**failed (exit 1)**")  # names what this machine lacks
    assert all(status == "skipped (no CUDA)" for name, (status, _) in s.items() if name not in ("env", "deps"))
    assert wall < 40
    checked = 0
    for name, (_, cmd) in s.items():
        m = re.search(r"--recipe recipes/small/(\w+)\.toml", cmd)
        if m:
            path = ROOT / "recipes" / "small" / f"{m.group(1)}.toml"
            resolve_recipe(recipe_class(m.group(1)), m.group(1), recipe_file=str(path), overrides=re.findall(r"--set (\S+)", cmd))
            checked += 1
    assert checked == 9


def test_check_ends_inside_its_budget_whatever_hangs(tmp_path):
    """Every step hangs (a 'python' that sleeps): each is killed at its share, the run ends in budget."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexec sleep 1000\n")
    fake.chmod(0o755)
    proc, results, wall = run_check(tmp_path, "--cpu", budget=20, env={"PYTHON": str(fake)})
    assert proc.returncode == 1  # a step failed: said so in the exit status
    assert wall < 20 + 1, wall
    s = steps(results)
    assert len(s) == 15
    assert s["env"][0] == "**timeout**"
    assert all(status in ("**timeout**", "skipped (budget spent)") for status, _ in s.values())


def test_check_rejects_a_bad_budget(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--budget", "soon"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error:")


# ----------------------------------------------------------------------------- CUDA only


def _micro_batch(cfg, device, B=4, T=128):
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)).to(device)
    return x[:, :-1], x[:, 1:]


@pytest.mark.gpu
@cuda
def test_bf16_training_step_cuda():
    """One MuonClip step of the small model computing in bf16 (float32 weights): finite loss, grads, statistic."""
    import torch.nn.functional as F

    from k2cli.model.precision import compute_dtype
    from k2cli.model.transformer import build_model
    from k2cli.optim.muon import OptimConfig, build_optimizer

    cfg = ModelConfig.from_preset("small")
    model = build_model(cfg, seed=0).cuda().train()
    opt = build_optimizer(model, OptimConfig(name="muonclip"))
    inputs, targets = _micro_batch(cfg, "cuda")
    with compute_dtype(model, torch.bfloat16):
        logits, stats = model(inputs, stats=True, max_logits=True)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()) + 1e-4 * stats.balance_loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    ml = stats.max_logits
    assert ml.shape == (cfg.num_hidden_layers, cfg.num_attention_heads) and torch.isfinite(ml).all()
    opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_kernel_cuda_k2_head_shape(dtype):
    """Compiled kernel at K2's head shape (d = 192, dv = 128) vs float64 attention: out, grads, statistic."""
    pytest.importorskip("triton")
    from k2cli.model.triton_attention import flash_attention

    g = torch.Generator().manual_seed(0)
    B, H, T, d, dv = 2, 4, 300, 192, 128
    q, k, v = (torch.randn(B, H, T, w, generator=g).cuda().to(dtype).requires_grad_(True) for w in (d, d, dv))
    scale = d**-0.5
    out, head_max = flash_attention(q, k, v, scale)
    qd, kd, vd = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    s = (qd @ kd.mT) * scale
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device="cuda").tril(), float("-inf"))
    ref = torch.softmax(s, -1) @ vd
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(head_max.double(), s.amax(dim=(0, 2, 3)), atol=1e-3, rtol=1e-3)
    gout = torch.randn(out.shape, generator=g).cuda()
    grads = torch.autograd.grad(out, (q, k, v), gout.to(dtype))
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), gout.double())
    for got, want in zip(grads, ref_grads):
        assert (got.double() - want).abs().max() <= (2e-2 if dtype == torch.bfloat16 else 1e-4) * want.abs().max()


@pytest.mark.gpu
@cuda
def test_model_uses_triton_on_cuda_and_matches_sdpa():
    """attention.py picks the kernel on CUDA; loss and statistic agree with sdpa + the separate pass."""
    pytest.importorskip("triton")
    from k2cli.model import attention
    from k2cli.model.transformer import build_model

    cfg = ModelConfig.from_preset("small")
    model = build_model(cfg, seed=0).cuda()
    inputs, _ = _micro_batch(cfg, "cuda", B=2, T=256)
    q = torch.zeros(1, 1, 1, 16, device="cuda")
    assert attention.use_triton(q)

    def run(backend):
        attention.ATTENTION_BACKEND = backend
        try:
            with torch.no_grad():
                logits, stats = model(inputs, stats=True, max_logits=True)
                return logits, stats.max_logits
        finally:
            attention.ATTENTION_BACKEND = "auto"

    (lt, mt), (ls, ms) = run("auto"), run("sdpa")
    torch.testing.assert_close(lt, ls, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(mt, ms, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@cuda
def test_mfu_peak_reachable_cuda():
    """The measured bf16 matmul peak is a real fraction of the datasheet's dense figure (not sparse)."""
    from k2cli.train import mfu

    measured = mfu.measure_matmul_peak("cuda")
    sheet = mfu.datasheet_tflops(torch.cuda.get_device_name())
    print(f"{torch.cuda.get_device_name()}: measured {measured:.0f} TFLOP/s bf16, datasheet {sheet}")
    assert measured > 1
    if sheet is not None:
        assert 0.4 * sheet < measured < 1.1 * sheet
        assert mfu.device_peak("cuda").source == "datasheet"


@pytest.mark.gpu
@cuda
def test_generate_bf16_cuda():
    from k2cli.model.generate import generate
    from k2cli.model.transformer import build_model

    cfg = ModelConfig.from_preset("tiny")
    model = build_model(cfg, seed=0).cuda().to(torch.bfloat16).eval()
    out = generate(model, [[1, 2, 3, 4], [5, 6]], max_new_tokens=8)
    assert len(out) == 2 and all(1 <= len(o) <= 8 and all(0 <= t < cfg.vocab_size for t in o) for o in out)
