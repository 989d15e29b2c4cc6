"""MuonClip, Newton-Schulz, QK-Clip and the lr schedule (k2cli.optim)."""

import dataclasses
import io
import math

import pytest
import torch
import torch.nn.functional as F

from k2cli.errors import K2Error
from k2cli.model.config import ModelConfig
from k2cli.model.transformer import build_model
from k2cli.optim import muon
from k2cli.optim.muon import OptimConfig, build_optimizer, muon_update, newton_schulz, orthogonalize
from k2cli.optim.schedule import ScheduleConfig, lr_at


def tiny_model(**changes):
    cfg = dataclasses.replace(ModelConfig.from_preset("tiny"), **changes)
    return build_model(cfg, seed=0)


def random_grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def with_spectrum(shape, lo, hi, gen):
    """A matrix U diag(s) V^T with singular values log-uniform in [lo, hi] (condition <= hi/lo)."""
    A, B = shape
    k = min(A, B)
    U, _ = torch.linalg.qr(torch.randn(A, k, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(B, k, generator=gen))
    s = torch.exp(torch.rand(k, generator=gen) * (math.log(hi) - math.log(lo)) + math.log(lo))
    return U @ torch.diag(s) @ V.T


# ----------------------------------------------------------------------------- Newton-Schulz


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (128, 128), (96, 256), (256, 96)])
def test_newton_schulz_singular_values(shape):
    gen = torch.Generator().manual_seed(0)
    G = with_spectrum(shape, 1.0, 10.0, gen) * 37.0  # the scale must not matter
    O = newton_schulz(G)
    assert O.shape == G.shape and O.dtype == G.dtype
    sv = torch.linalg.svdvals(O)
    assert 0.6 <= sv.min() and sv.max() <= 1.25, (sv.min(), sv.max())


def test_newton_schulz_batched_is_per_matrix(monkeypatch):
    # Matrices of wildly different scales in one batch: normalisation must be per matrix.
    gen = torch.Generator().manual_seed(1)
    for shape in [(48, 96), (80, 40)]:
        G = torch.stack([with_spectrum(shape, 1.0, 10.0, gen) * s for s in (1e-3, 1.0, 1e3, 5.0)])  # [4, A, B]
        O = newton_schulz(G)
        assert O.shape == G.shape
        sv = torch.linalg.svdvals(O)  # [4, min(A, B)]
        assert 0.6 <= sv.min() and sv.max() <= 1.25, (sv.min(), sv.max())
        for i in range(4):
            torch.testing.assert_close(O[i], newton_schulz(G[i]), rtol=1e-5, atol=1e-6)
    # orthogonalize batches mixed shapes, tall with wide, in chunks (here of 2 matrices), and
    # returns each in its own shape without writing into its inputs (they may be momentum buffers)
    monkeypatch.setitem(muon.NS_CHUNK_ELEMENTS, "cpu", 2 * 16 * 32)
    mats = [torch.randn(3, 16, 32, generator=gen), torch.randn(2, 32, 16, generator=gen), torch.randn(1, 8, 8, generator=gen),
            torch.randn(5, 20, 12, generator=gen)]
    copies = [m.clone() for m in mats]
    for m, o, c in zip(mats, orthogonalize(mats), copies):
        assert o.shape == m.shape and torch.equal(m, c)
        torch.testing.assert_close(o, newton_schulz(m), rtol=1e-5, atol=1e-6)


def test_newton_schulz_keeps_dtype():
    G = torch.randn(16, 32, dtype=torch.float64)
    assert newton_schulz(G).dtype == torch.float64
    assert newton_schulz(G.bfloat16()).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- Muon update


@pytest.mark.parametrize("shape", [(64, 64), (64, 256), (256, 64), (8, 128), (4, 96, 48)])
def test_muon_update_rms(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    update = muon_update(g, torch.zeros(shape))
    rms = update.pow(2).mean().sqrt().item()
    assert 0.15 <= rms <= 0.25, rms


def test_applied_update_rms_on_model():
    """What the optimizer actually applies to every Muon matrix (wd = 0), divided by lr."""
    model = tiny_model()
    lr = 1e-3
    opt = build_optimizer(model, OptimConfig(name="muon", lr=lr, weight_decay=0.0))
    group = next(g for g in opt.param_groups if g["kind"] == "muon")
    before = [p.detach().clone() for p in group["params"]]
    random_grads(model, seed=0)
    opt.step()
    for p, w0, (A, B) in zip(group["params"], before, group["matrix_shapes"]):
        per_matrix = ((w0 - p.detach()) / lr).reshape(-1, A, B)
        rms = per_matrix.pow(2).mean(dim=(1, 2)).sqrt()
        assert rms.min() >= 0.15 and rms.max() <= 0.25, (tuple(p.shape), rms.min(), rms.max())


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_matches_torch_muon(monkeypatch):
    """Our Muon half against torch.optim.Muon(adjust_lr_fn="match_rms_adamw"), three steps.

    Apples to apples, from torch/optim/_muon.py (torch 2.13):
      * momentum: torch keeps the EMA form buf <- lerp(buf, g, 1 - mu) and uses
        lerp(g, buf, mu) for nesterov; both are (1 - mu) x ours (M <- mu M + g; g + mu M), and
        NS normalises by the Frobenius norm, so the updates agree (three steps with different
        grads so the momentum convention is exercised, not just step one);
      * weight decay: W *= 1 - lr*wd with the unadjusted lr, then W -= 0.2 sqrt(max(A, B)) lr O: same;
      * Newton-Schulz: torch ALWAYS runs it in bfloat16 (`grad.bfloat16()`), ours in float32 on
        CPU. To compare the fp32 paths we make `.bfloat16()` a no-op copy while torch's code
        runs, so torch's own NS executes in float32;
      * torch.optim.Muon refuses 3-D params: the expert tensors are compared slice by slice
        (gate_e, up_e as separate [I, D] matrices, down_e as [D, I]), which also checks that we
        orthogonalise gate and up separately.
    """
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self, *a, **k: self.clone())
    lr, wd = 0.02, 0.1
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(name="muon", lr=lr, weight_decay=wd))
    layer0, layer1 = model.layers[0], model.layers[1]
    assert layer1.is_moe
    experts = layer1.mlp.experts
    I = experts.down_proj.shape[2]
    # our parameter -> list of (index into it, matching 2-D slice) for torch
    checks = {
        "o_proj": (layer0.self_attn.o_proj.weight, [(slice(None),)]),
        "q_b_proj (tall)": (layer0.self_attn.q_b_proj.weight, [(slice(None),)]),
        "dense down_proj (tall)": (layer0.mlp.down_proj.weight, [(slice(None),)]),
        "router": (layer1.mlp.gate.weight, [(slice(None),)]),
        "gate_up_proj": (experts.gate_up_proj, [(e, rows) for e in range(experts.num_experts)
                                                for rows in (slice(0, I), slice(I, 2 * I))]),
        "down_proj": (experts.down_proj, [(e,) for e in range(experts.num_experts)]),
    }
    ref = {name: [torch.nn.Parameter(p.detach()[idx].clone()) for idx in idxs] for name, (p, idxs) in checks.items()}
    start = {name: p.detach().clone() for name, (p, _) in checks.items()}
    ref_opt = torch.optim.Muon([q for qs in ref.values() for q in qs], lr=lr, weight_decay=wd, momentum=0.95,
                               nesterov=True, adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        random_grads(model, seed=step)
        for name, (p, idxs) in checks.items():
            for q, idx in zip(ref[name], idxs):
                q.grad = p.grad[idx].clone()
        opt.step()
        ref_opt.step()
        for name, (p, idxs) in checks.items():
            ours = p.detach() - start[name]
            theirs = torch.zeros_like(ours)
            for q, idx in zip(ref[name], idxs):
                theirs[idx] = q.detach() - start[name][idx]
            rel = ((ours - theirs).norm() / theirs.norm()).item()
            assert rel < 1e-5, (name, step, rel)


def test_adamw_half_matches_torch_adamw():
    model = tiny_model()
    cfg = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    decayed = [p for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    plain = [p for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    clones = lambda ps: [torch.nn.Parameter(p.detach().clone()) for p in ps]  # noqa: E731
    rd, rp = clones(decayed), clones(plain)
    ref = torch.optim.AdamW([{"params": rd, "weight_decay": 0.1}, {"params": rp, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step in range(3):
        random_grads(model, seed=step)
        for q, p in zip(rd + rp, decayed + plain):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for q, p in zip(rd + rp, decayed + plain):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- routing


def test_param_routing():
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig())
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"muon", "adamw", "adamw_no_decay"}
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    named = dict(model.named_parameters())
    muon = ids(groups["muon"]["params"])
    expected_muon = {id(p) for n, p in named.items() if n.startswith("layers.") and p.ndim >= 2}
    assert muon == expected_muon
    for layer in model.layers:
        for mod in (layer.self_attn.q_b_proj, layer.self_attn.kv_b_proj, layer.self_attn.o_proj):
            assert id(mod.weight) in muon
        if layer.is_moe:
            for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj, layer.mlp.gate.weight,
                      layer.mlp.shared_experts.up_proj.weight):
                assert id(p) in muon
    assert ids(groups["adamw"]["params"]) == {id(model.embed_tokens.weight), id(model.lm_head.weight)}
    assert ids(groups["adamw_no_decay"]["params"]) == {id(p) for p in model.parameters() if p.ndim == 1}
    assert groups["adamw_no_decay"]["weight_decay"] == 0.0 and groups["adamw"]["weight_decay"] == 0.1
    # each parameter exactly once overall
    all_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))
    # expert tensors are batches of matrices: gate/up split, down per expert
    cfg = model.config
    shapes = dict(zip(map(id, groups["muon"]["params"]), groups["muon"]["matrix_shapes"]))
    experts = model.layers[1].mlp.experts
    assert shapes[id(experts.gate_up_proj)] == (cfg.moe_intermediate_size, cfg.hidden_size)
    assert shapes[id(experts.down_proj)] == (cfg.hidden_size, cfg.moe_intermediate_size)


def test_tied_embeddings_go_to_adamw_once():
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    opt = build_optimizer(model, OptimConfig())
    hits = [g["name"] for g in opt.param_groups for p in g["params"] if p is model.embed_tokens.weight]
    assert hits == ["adamw"]
    all_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))
    random_grads(model, seed=0)
    opt.step()  # a tied weight stepped once: its Adam step count is 1, not 2
    assert opt.state[model.embed_tokens.weight]["step"].item() == 1


def test_adamw_baseline_routes_everything_to_adamw():
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(name="adamw"))
    assert all(g["kind"] == "adamw" for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    random_grads(model, seed=0)
    opt.step()
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in opt.state.values())
    assert opt.clip_qk(torch.full((model.config.num_hidden_layers, model.config.num_attention_heads), 1e6)).sum() == 0


# ----------------------------------------------------------------------------- QK-Clip


def attention_inputs(model, ids):
    """Run the model once; return each attention layer's (x, cos, sin) and the stats' [L, H] maxima."""
    captured, hooks = [], []
    for attn in model.attention_layers():
        hooks.append(attn.register_forward_pre_hook(lambda mod, args: captured.append(tuple(a.detach() for a in args[:3]))))
    with torch.no_grad():
        _, stats = model(ids, stats=True, max_logits=True)
    for h in hooks:
        h.remove()
    return captured, stats.max_logits


def per_layer_max_logits(model, captured):
    """Each layer's per-head max logits on FIXED inputs (clipping layer l changes later layers' inputs)."""
    out = []
    with torch.no_grad():
        for attn, (x, cos, sin) in zip(model.attention_layers(), captured):
            out.append(attn(x, cos, sin, max_logit=True)[1])
    return torch.stack(out)  # [L, H]


@pytest.mark.parametrize("q_lora_rank", [64, 0])
def test_qk_clip_invariant(q_lora_rank):
    model = tiny_model(q_lora_rank=q_lora_rank)
    cfg = model.config
    H, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    with torch.no_grad():  # make logits large, as a run with exploding logits would have them
        gen = torch.Generator().manual_seed(3)
        for attn in model.attention_layers():
            q = attn.q_b_proj if q_lora_rank else attn.q_proj
            # per-head factors so that heads differ a lot
            q.weight.view(H, dn + dr, -1).mul_(torch.rand(H, 1, 1, generator=gen) * 40 + 5)
            attn.kv_b_proj.weight.view(H, dn + dv, -1)[:, :dn].mul_(torch.rand(H, 1, 1, generator=gen) * 40 + 5)
            attn.kv_a_proj_with_mqa.weight.mul_(10)
    ids = torch.randint(0, cfg.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
    captured, stats_max = attention_inputs(model, ids)
    before = per_layer_max_logits(model, captured)
    torch.testing.assert_close(before, stats_max, rtol=0, atol=0)  # the same statistic as ForwardStats
    vals = before.flatten().sort().values
    k = len(vals) // 2
    tau = float((vals[k - 1] + vals[k]) / 2)
    assert tau > 10  # the clip is exercised at realistic logit sizes
    over = before > tau
    assert over.any() and (~over).any()

    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(name="muonclip", qk_clip_tau=tau))
    counts = opt.clip_qk(stats_max)
    assert counts.tolist() == over.sum(dim=1).tolist()

    after = per_layer_max_logits(model, captured)
    torch.testing.assert_close(after[over], torch.full_like(after[over], tau), rtol=1e-4, atol=0)
    assert torch.equal(after[~over], before[~over])  # untouched heads: bit-identical logits

    # Weights: only the q rows and k^C rows of clipped heads changed, by exactly the right factors.
    q_name = "q_b_proj" if q_lora_rank else "q_proj"
    for n, p in model.named_parameters():
        w = p.detach()
        if not (n.endswith(f"self_attn.{q_name}.weight") or n.endswith("self_attn.kv_b_proj.weight")):
            assert torch.equal(w, w0[n]), n  # kv_a_proj_with_mqa (shared rope key), o_proj, q_a_proj, MLPs, ...
            continue
        layer = int(n.split(".")[1])
        gamma = torch.where(over[layer], tau / before[layer], torch.ones(H))[:, None, None]
        new, old = w.view(H, -1, w.shape[-1]), w0[n].view(H, -1, w.shape[-1])
        keep = ~over[layer]
        assert torch.equal(new[keep], old[keep]), n  # heads at or below tau
        if "kv_b_proj" in n:
            assert torch.equal(new[:, dn:], old[:, dn:]), n  # value rows: never touched
            torch.testing.assert_close(new[:, :dn], old[:, :dn] * gamma.sqrt())  # k^C
        else:
            torch.testing.assert_close(new[:, :dn], old[:, :dn] * gamma.sqrt())  # q^C
            torch.testing.assert_close(new[:, dn:], old[:, dn:] * gamma)  # q^R


def test_qk_clip_is_noop_without_muonclip():
    model = tiny_model()
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, OptimConfig(name="muon", qk_clip_tau=1.0))
    assert opt.clip_qk(torch.full((L, H), 1e4)).tolist() == [0] * L
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0))
    opt = build_optimizer(model, OptimConfig(name="muonclip", qk_clip_tau=1.0))
    assert opt.clip_qk(torch.full((L, H), 0.5)).tolist() == [0] * L  # all heads at or below tau
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0))
    assert opt.clip_qk(torch.full((L, H), 2.0)).tolist() == [H] * L


# ----------------------------------------------------------------------------- schedule


def test_schedule_warmup_stable_decay():
    cfg = ScheduleConfig(warmup_steps=10, decay_fraction=0.3, final_lr_fraction=0.1)
    lr = lambda s: lr_at(s, 100, 2.0, cfg)  # noqa: E731
    assert lr(0) == pytest.approx(0.2)  # (0 + 1) / 10 * peak: near 0, never exactly 0
    assert lr(4) == pytest.approx(1.0)
    assert lr(9) == pytest.approx(2.0)  # warm-up ends on the peak
    assert lr(10) == lr(50) == lr(69) == 2.0  # stable
    # decay: steps 70..99, p = (step - 70 + 1) / 30
    assert lr(70) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 30))))
    assert lr(84) == pytest.approx(2.0 * 0.55)  # p = 1/2: halfway between peak and floor
    assert lr(99) == pytest.approx(0.2, rel=1e-12)  # the floor, exactly at the last step
    lrs = [lr(s) for s in range(100)]
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[69:], lrs[70:]))
    assert min(lrs) == lrs[-1]


def test_schedule_short_run_and_edges():
    cfg = ScheduleConfig(warmup_steps=20, decay_fraction=0.3, final_lr_fraction=0.1)
    # shorter than the warm-up: the smaller factor wins and the run still ends on the floor
    assert [lr_at(s, 3, 1.0, cfg) for s in range(3)] == pytest.approx([0.05, 0.1, 0.1])
    assert lr_at(0, 10, 1.0, ScheduleConfig(warmup_steps=0, decay_fraction=0.0)) == 1.0
    assert lr_at(9, 10, 1.0, ScheduleConfig(warmup_steps=0, decay_fraction=0.0)) == 1.0  # no decay asked
    with pytest.raises(K2Error):
        lr_at(0, 0, 1.0, cfg)


# ----------------------------------------------------------------------------- checkpoints


def train_steps(model, opt, steps, start=0, total=4):
    ids = torch.randint(0, model.config.vocab_size, (total, 2, 24), generator=torch.Generator().manual_seed(7))
    for step in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        logits, stats = model(ids[step, :, :-1], stats=True, max_logits=True)
        loss = F.cross_entropy(logits.flatten(0, 1), ids[step, :, 1:].flatten())
        loss.backward()
        opt.set_lr(lr_at(step, total, 1e-2, ScheduleConfig(warmup_steps=2)))
        opt.step()
        opt.clip_qk(stats.max_logits)


def test_state_dict_round_trip_is_exact():
    cfg = OptimConfig(name="muonclip", lr=1e-2, qk_clip_tau=0.05)  # a low tau so the clip fires too
    straight = tiny_model()
    opt = build_optimizer(straight, cfg)
    train_steps(straight, opt, 4)

    first = tiny_model()
    opt1 = build_optimizer(first, cfg)
    train_steps(first, opt1, 2)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = tiny_model()
    resumed.load_state_dict(saved["model"])
    opt2 = build_optimizer(resumed, cfg)
    opt2.load_state_dict(saved["optim"])
    train_steps(resumed, opt2, 2, start=2)

    changed = False
    for (n, a), b, c in zip(straight.named_parameters(), resumed.parameters(), tiny_model().parameters()):
        assert torch.equal(a, b), n
        changed |= not torch.equal(a, c)
    assert changed


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"name": "muonclp"}, ["muonclp", "did you mean 'muonclip'"]),
        ({"name": "sgd"}, ["sgd", "adamw"]),
        ({"lr": 0.0}, ["optim.lr", "positive"]),
        ({"lr": -1e-3}, ["optim.lr"]),
        ({"lr": float("nan")}, ["optim.lr"]),
        ({"weight_decay": -0.1}, ["optim.weight_decay"]),
        ({"lr": 1.0, "weight_decay": 2.0}, ["weight_decay", ">= 1"]),
        ({"momentum": 1.0}, ["optim.momentum", "[0, 1)"]),
        ({"ns_steps": 0}, ["optim.ns_steps"]),
        ({"adam_beta2": 1.5}, ["optim.adam_beta2"]),
        ({"adam_eps": 0.0}, ["optim.adam_eps"]),
        ({"qk_clip_tau": 0.0}, ["optim.qk_clip_tau"]),
    ],
)
def test_bad_optim_config(changes, words):
    cfg = OptimConfig(**changes)
    with pytest.raises(K2Error) as e:
        cfg.validate()
    for w in words:
        assert w in e.value.line(), (w, e.value.line())
    assert e.value.hint  # every message says how to fix it
    with pytest.raises(K2Error):
        build_optimizer(tiny_model(), cfg)


@pytest.mark.parametrize(
    "changes, word",
    [({"warmup_steps": -1}, "warmup_steps"), ({"decay_fraction": 1.5}, "decay_fraction"),
     ({"final_lr_fraction": -0.1}, "final_lr_fraction")],
)
def test_bad_schedule_config(changes, word):
    with pytest.raises(K2Error, match=word):
        ScheduleConfig(**changes).validate()


def test_good_configs_validate():
    for name in ("muonclip", "muon", "adamw"):
        OptimConfig(name=name).validate()
    ScheduleConfig().validate()
