"""The model core: causality, KV cache, router, max-logit statistic, shapes and counts."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from k2cli.errors import K2Error
from k2cli.model import attention as attention_mod
from k2cli.model import blocked_attention as blocked
from k2cli.model import moe as moe_mod
from k2cli.model.config import ModelConfig, RopeScaling
from k2cli.model.generate import KVCache, generate
from k2cli.model.transformer import K2Model, build_model


def test_causal(tiny_cfg):
    model = build_model(tiny_cfg, seed=0)
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 32))
    y = x.clone()
    y[:, 20:] = torch.randint(0, tiny_cfg.vocab_size, (2, 12))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert (a[:, :20] - b[:, :20]).abs().max() < 1e-6  # bitwise up to matmul blocking
    assert not torch.allclose(a[:, 20:], b[:, 20:])


@pytest.mark.parametrize("q_lora", [64, 0])
def test_kv_cache_matches_full_forward(tiny_cfg, q_lora):
    cfg = dataclasses.replace(tiny_cfg, q_lora_rank=q_lora)
    model = build_model(cfg, seed=1)
    x = torch.randint(0, cfg.vocab_size, (3, 40))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model, 3, 40)
        pieces = [model(x[:, :17], cache=cache)]  # prefill (expanded form)
        for t in range(17, 22):  # one token at a time (absorbed form)
            pieces.append(model(x[:, t : t + 1], cache=cache))
        pieces.append(model(x[:, 22:25], cache=cache))  # a short chunk (absorbed, causal within)
        pieces.append(model(x[:, 25:], cache=cache))  # a long chunk (expanded, offset mask)
    stepped = torch.cat(pieces, dim=1)
    assert torch.allclose(stepped, full, atol=1e-5), (stepped - full).abs().max()


def test_cache_stores_only_the_latent(tiny_cfg):
    model = build_model(tiny_cfg)
    cache = KVCache(model, 2, 10)
    assert cache.latent.shape[-1] == tiny_cfg.kv_lora_rank
    assert cache.k_rope.shape[-1] == tiny_cfg.qk_rope_head_dim


def test_generate_batched_equals_one_by_one(tiny_cfg):
    model = build_model(tiny_cfg, seed=2)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    together = generate(model, prompts, max_new_tokens=6)
    alone = [generate(model, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone
    # greedy continuation equals argmax of a full forward
    ids = torch.tensor([prompts[1] + together[1][:-1]])
    with torch.no_grad():
        expect = model(ids)[0, len(prompts[1]) - 1 :].argmax(-1).tolist()
    assert together[1] == expect


def test_generate_stop_tokens_and_seeded_sampling(tiny_cfg):
    model = build_model(tiny_cfg, seed=3)
    greedy = generate(model, [[1, 2, 3]], max_new_tokens=8)[0]
    stop = greedy[2]
    cut = generate(model, [[1, 2, 3]], max_new_tokens=8, stop_ids=(stop,))[0]
    assert cut == greedy[: greedy.index(stop) + 1]
    a = generate(model, [[1, 2, 3]] * 2, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    b = generate(model, [[1, 2, 3]] * 2, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert a == b


def test_router_bias_changes_selection_not_weights(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, routed_scaling_factor=2.5)
    router = build_model(cfg, seed=4).routers()[0]
    x = torch.randn(64, cfg.hidden_size)
    idx0, w0, scores = router(x)
    router.e_score_correction_bias[3] = 10.0  # force expert 3 into every token's top-k
    idx1, w1, scores1 = router(x)
    assert torch.equal(scores, scores1)
    assert (idx1 == 3).any(-1).all() and not (idx0 == 3).any(-1).all()
    # the combine weights are the ORIGINAL scores of the chosen experts, normalised, scaled
    chosen = scores.gather(1, idx1)
    assert torch.allclose(w1, chosen / chosen.sum(-1, keepdim=True) * 2.5)


def test_group_limited_routing_stays_in_top_groups(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    router = build_model(cfg, seed=5).routers()[0]
    idx, _, _ = router(torch.randn(128, cfg.hidden_size))
    groups_used = (idx // 4).sort(-1).values
    assert all(len(set(row.tolist())) <= 2 for row in groups_used)


def test_max_logit_statistic_equals_brute_force(tiny_cfg):
    model = build_model(tiny_cfg, seed=6)
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 12))
    captured = []

    def grab(module, args, kwargs, output):
        captured.append(args)

    hooks = [layer.self_attn.register_forward_hook(grab, with_kwargs=True) for layer in model.layers]
    with torch.no_grad():
        _, stats = model(x, stats=True, max_logits=True)
    for h in hooks:
        h.remove()
    got = stats.max_logits  # [L, H]
    for layer_idx, layer in enumerate(model.layers):
        attn = layer.self_attn
        hidden, cos, sin = captured[layer_idx][:3]
        B, T, _ = hidden.shape
        with torch.no_grad():
            q = attn.queries(hidden).view(B, T, attn.n_heads, -1)
            latent, k_rope = attn.kv_a_proj_with_mqa(hidden).split([attn.r, attn.dr], -1)
            kv = attn.kv_b_proj(attn.kv_a_layernorm(latent)).view(B, T, attn.n_heads, -1)
        from k2cli.model.rope import apply_rope

        for h in range(attn.n_heads):
            best = -float("inf")
            for b in range(B):
                qn, qr = q[b, :, h, : attn.dn], apply_rope(q[b, :, h, attn.dn :], cos[b], sin[b])
                kn, kr = kv[b, :, h, : attn.dn], apply_rope(k_rope[b], cos[b], sin[b])
                for i in range(T):
                    for j in range(i + 1):  # causal: only keys at or before the query
                        s = (qn[i] @ kn[j] + qr[i] @ kr[j]) * attn.softmax_scale
                        best = max(best, float(s))
            assert got[layer_idx, h].item() == pytest.approx(best, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("T, S", [(37, 37), (5, 70)])  # plain causal (ragged last block); a chunk after a cache
@pytest.mark.parametrize("keep_probs", [True, False])  # probabilities saved for backward, or recomputed
def test_blocked_attention_matches_sdpa(monkeypatch, T, S, keep_probs):
    monkeypatch.setattr(blocked, "BLOCK_ROWS", 16)
    if not keep_probs:
        monkeypatch.setattr(blocked, "KEEP_PROBS_BYTES", 0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, T, 24, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, S, 24, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, S, 16, generator=g, dtype=torch.float64, requires_grad=True)  # values narrower, as in MLA
    d_out = torch.randn(2, 3, T, 16, generator=g, dtype=torch.float64)
    out, head_max = blocked.causal_attention(q, k, v, 0.3)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    visible = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]  # [T, S]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=0.3)
    ref_grads = torch.autograd.grad(ref, (q, k, v), d_out)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    scores = (q @ k.mT * 0.3).masked_fill(~visible, float("-inf"))
    assert torch.equal(head_max, scores.amax(dim=(0, 2, 3)).float())
    torch.testing.assert_close(blocked.max_logit_per_head(q, k, 0.3), head_max)  # (that one computes in float32)


def test_attention_backends_agree(monkeypatch, tiny_cfg):
    """CPU's blocked attention and scaled_dot_product_attention: same logits, gradients, max logits."""
    model = build_model(tiny_cfg, seed=9)
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 70))
    got = {}
    for backend in ("blocked", "sdpa"):
        monkeypatch.setattr(attention_mod, "ATTENTION_BACKEND", backend)
        logits, stats = model(x, stats=True, max_logits=True)
        logits.logsumexp(-1).mean().backward()
        got[backend] = (logits.detach(), stats.max_logits, [p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    (la, ma, ga), (lb, mb, gb) = got["blocked"], got["sdpa"]
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-5)
    torch.testing.assert_close(ma, mb, rtol=1e-6, atol=1e-6)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_moe_decoding_path_matches_grouped(tiny_cfg):
    """Fewer (token, expert) pairs than experts take the one-matmul-per-busy-expert path: same outputs and grads."""
    experts = build_model(tiny_cfg, seed=10).layers[-1].mlp.experts
    x = torch.randn(3, tiny_cfg.hidden_size, requires_grad=True)
    idx = torch.tensor([[0, 5], [5, 2], [7, 0]])  # 6 pairs < 8 experts
    w = torch.rand(3, 2)
    out = experts(x, idx, w)
    grads = torch.autograd.grad(out.square().sum(), (x, experts.gate_up_proj, experts.down_proj))
    ref = torch.zeros_like(out)  # one expert at a time, no dispatch at all
    for n in range(3):
        for slot in range(2):
            e = idx[n, slot]
            gate, up = (experts.gate_up_proj[e] @ x[n]).chunk(2)
            ref[n] += w[n, slot] * (experts.down_proj[e] @ (F.silu(gate) * up))
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, experts.gate_up_proj, experts.down_proj))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_stats_are_only_computed_when_asked(tiny_cfg):
    model = build_model(tiny_cfg)
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 8))
    assert torch.is_tensor(model(x))  # no stats unless asked
    _, stats = model(x, stats=True)
    assert stats.max_logits is None and len(stats.expert_counts) == tiny_cfg.num_moe_layers
    assert stats.expert_counts.sum(-1).tolist() == [2 * 8 * tiny_cfg.num_experts_per_tok] * tiny_cfg.num_moe_layers


def test_grouped_mm_fallback_matches(monkeypatch, tiny_cfg):
    model = build_model(tiny_cfg, seed=7)
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 16))
    with torch.no_grad():
        a = model(x)
        monkeypatch.setattr(moe_mod, "HAS_GROUPED_MM", False)
        b = model(x)
    assert torch.allclose(a, b, atol=1e-6)


def test_moe_gradients_reach_every_routed_expert(tiny_cfg):
    model = build_model(tiny_cfg, seed=8)
    x = torch.randint(0, tiny_cfg.vocab_size, (4, 64))
    model(x).logsumexp(-1).mean().backward()
    experts = model.layers[-1].mlp.experts
    per_expert = experts.gate_up_proj.grad.abs().sum(dim=(1, 2))
    assert (per_expert > 0).all()


def test_balance_loss_is_one_when_balanced():
    cfg = ModelConfig(n_routed_experts=4, num_experts_per_tok=1, hidden_size=8, num_hidden_layers=2)
    moe = build_model(cfg).layers[1].mlp
    idx = torch.arange(8).remainder(4).view(8, 1)  # every expert picked equally often
    scores = torch.full((8, 4), 0.5)
    assert moe._balance_loss(idx, scores, 1, 8).item() == pytest.approx(1.0)


def test_router_bias_update_sign_rule(tiny_cfg):
    routers = build_model(tiny_cfg).routers()
    loads = torch.zeros(len(routers), tiny_cfg.n_routed_experts)
    loads[:, 0] = 100  # expert 0 overloaded, the rest idle
    moe_mod.update_router_biases(routers, loads, rate=0.001)
    b = routers[0].e_score_correction_bias
    assert b[0] < 0 and (b[1:] > 0).all() and abs(float(b.sum())) < 1e-7
    assert b.dtype == torch.float32


def test_kimi_k2_counts():
    cfg = ModelConfig.from_preset("kimi-k2")
    counts = cfg.param_counts()
    assert 1.02e12 < counts["total"] < 1.04e12  # "about 1.03T" (the report rounds to 1.04T)
    assert 32.5e9 < counts["active"] < 33.3e9  # "about 32.9B" (the report says 32B)
    with torch.device("meta"):
        model = K2Model(cfg)
    assert model.num_params() == counts["total"]  # the formula agrees with the real module tree


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(qk_rope_head_dim=15), "even"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(n_group=3), "divide"),
        (dict(n_group=2, topk_group=3), "topk_group"),
        (dict(n_group=8, topk_group=1), "at least 2"),
        (dict(hidden_size=0), "positive"),
        (dict(first_k_dense_replace=9), "first_k_dense_replace"),
        (dict(rope_scaling=RopeScaling(factor=1.0)), "factor"),
        (dict(rope_scaling=RopeScaling(type="nope")), "rope_scaling.type"),
    ],
)
def test_impossible_shapes_are_rejected(tiny_cfg, change, words):
    with pytest.raises(K2Error, match=words):
        dataclasses.replace(tiny_cfg, **change).validate()
