"""RoPE scaling: YaRN's ramp and temperature, linear and NTK frequencies (hand-computed), and
transformers' DeepseekV3 computing the same logits as an extended model beyond its original context."""

import dataclasses
import math

import pytest
import torch

from k2cli.model.config import ModelConfig, RopeScaling
from k2cli.model.rope import inv_freq_and_scale, softmax_scale, yarn_correction_range, yarn_mscale, yarn_ramp
from k2cli.stages.extend_context import ExtendConfig, extended_config

from helpers import hf_logit_gap, load_hf_float64


def cfg_with(dim=16, base=10000.0, scaling=None, **kw):
    return ModelConfig(qk_rope_head_dim=dim, rope_theta=base, rope_scaling=scaling, **kw)


def plain(dim, base):
    return torch.tensor([base ** (-2 * i / dim) for i in range(dim // 2)])


# ----------------------------------------------------------------------------- temperature


def test_mscale_hand_values():
    assert yarn_mscale(1.0) == 1.0 and yarn_mscale(0.5) == 1.0  # no temperature without extension
    assert yarn_mscale(4.0) == pytest.approx(1.1386294361, abs=1e-9)  # 0.1 ln 4 + 1
    assert yarn_mscale(32.0) == pytest.approx(1.3465735903, abs=1e-9)  # K2's factor
    assert yarn_mscale(40.0, 0.707) == pytest.approx(0.0707 * math.log(40) + 1, abs=1e-12)  # DeepSeek-V2 style mscale


def test_softmax_scale_carries_mscale_squared():
    base = cfg_with(qk_nope_head_dim=32)
    k2 = dataclasses.replace(base, rope_scaling=RopeScaling(factor=32, original_max_position_embeddings=4096,
                                                             beta_fast=1, beta_slow=1))
    assert softmax_scale(base) == pytest.approx(48 ** -0.5)
    assert softmax_scale(k2) == pytest.approx(48 ** -0.5 * 1.3465735903 ** 2, rel=1e-9)
    # mscale == mscale_all_dim: the cos/sin multiplier is exactly 1, all temperature sits in the softmax
    assert inv_freq_and_scale(k2)[1] == 1.0
    # without mscale_all_dim (the YaRN paper's form) cos/sin carry mscale and the softmax does not
    paper = dataclasses.replace(base, rope_scaling=RopeScaling(factor=4, original_max_position_embeddings=256, mscale=0,
                                                                mscale_all_dim=0))
    assert inv_freq_and_scale(paper)[1] == pytest.approx(1.1386294361)
    assert softmax_scale(paper) == pytest.approx(48 ** -0.5)


# ----------------------------------------------------------------------------- the ramp


def test_correction_range_deepseek_v3_and_k2():
    # DeepSeek-V3: rope dim 64, base 10000, original 4096, beta 32/1.
    #   pair(r) = 64 ln(4096 / (2 pi r)) / (2 ln 10000): r=32 -> 10.47 (floor 10), r=1 -> 22.51 (ceil 23)
    assert yarn_correction_range(32, 1, 64, 10000, 4096) == (10, 23)
    # Kimi K2: base 50000, beta 1/1: both ends at pair 19.16 -> [19, 20], a one-pair step
    assert yarn_correction_range(1, 1, 64, 50000, 4096) == (19, 20)
    # tiny: rope dim 16, original 256: r=32 -> 0.21 (floor 0), r=1 -> 3.22 (ceil 4); K2 betas -> (3, 4)
    assert yarn_correction_range(32, 1, 16, 10000, 256) == (0, 4)
    assert yarn_correction_range(1, 1, 16, 10000, 256) == (3, 4)
    # clamped to the pair range
    assert yarn_correction_range(10000, 1e-9, 16, 10000, 256) == (0, 15)  # as the reference: dim - 1


def test_ramp_values():
    r = yarn_ramp(10, 23, 32)
    assert r[:11].tolist() == [0.0] * 11 and r[23:].tolist() == [1.0] * 9
    assert r[16].item() == pytest.approx(6 / 13)
    assert torch.all(r[1:] >= r[:-1])
    step = yarn_ramp(19, 20, 32)  # K2: a hard step between pair 19 and 20
    assert step.tolist() == [0.0] * 20 + [1.0] * 12
    same = yarn_ramp(3, 3, 8)  # low == high: the reference's +0.001 avoids a division by zero
    assert same[:4].tolist() == [0.0] * 4 and same[4:].tolist() == [1.0] * 4


def test_yarn_frequencies_hand_computed_deepseek_betas():
    # tiny, factor 4, beta 32/1: ramp over pairs [0, 4] = 0, .25, .5, .75, 1, 1, 1, 1
    # new theta = (1 - gamma) theta / s + gamma theta with gamma = 1 - ramp  ->  theta * (1 - 0.75 ramp)
    cfg = cfg_with(scaling=RopeScaling(factor=4, original_max_position_embeddings=256, beta_fast=32, beta_slow=1))
    inv, scale = inv_freq_and_scale(cfg)
    theta = plain(16, 10000.0)
    ramp = torch.tensor([0, 0.25, 0.5, 0.75, 1, 1, 1, 1])
    assert torch.allclose(inv, theta * (1 - 0.75 * ramp), rtol=1e-6)
    assert inv[0] == pytest.approx(1.0)  # 40 rotations over 256 tokens: kept
    assert inv[7] == pytest.approx(theta[7].item() / 4)  # a fraction of a rotation: interpolated
    assert scale == 1.0


def test_yarn_frequencies_k2_betas_are_a_step():
    cfg = cfg_with(scaling=RopeScaling(factor=4, original_max_position_embeddings=256, beta_fast=1, beta_slow=1))
    inv, _ = inv_freq_and_scale(cfg)
    theta = plain(16, 10000.0)
    assert torch.allclose(inv[:4], theta[:4], rtol=1e-6)  # >= 1.29 rotations over the original context: kept
    assert torch.allclose(inv[4:], theta[4:] / 4, rtol=1e-6)  # fewer than one rotation: interpolated


def test_linear_and_ntk_frequencies():
    theta = plain(16, 10000.0)
    lin, s1 = inv_freq_and_scale(cfg_with(scaling=RopeScaling(type="linear", factor=4, original_max_position_embeddings=256)))
    assert torch.allclose(lin, theta / 4, rtol=1e-6) and s1 == 1.0
    ntk, s2 = inv_freq_and_scale(cfg_with(scaling=RopeScaling(type="ntk", factor=4, original_max_position_embeddings=256)))
    # base' = 10000 * 4^(16/14): the highest frequency is unchanged, the lowest is divided by exactly 4
    base = 10000.0 * 4 ** (16 / 14)
    assert torch.allclose(ntk, plain(16, base), rtol=1e-6) and s2 == 1.0
    assert ntk[0] == 1.0 and ntk[7].item() == pytest.approx(theta[7].item() / 4, rel=1e-5)
    assert torch.all(ntk <= theta + 1e-12) and torch.all(ntk >= theta / 4 - 1e-12)


def test_extended_config_for_each_method():
    base = ModelConfig.from_preset("tiny")  # 256 positions
    yarn, orig = extended_config(base, ExtendConfig(method="yarn", factor=4, beta_fast=1, beta_slow=1), 512)
    assert orig == 256 and yarn.max_position_embeddings == 1024
    assert yarn.rope_scaling == RopeScaling("yarn", 4.0, 256, 1.0, 1.0, 1.0, 1.0)
    lin, _ = extended_config(base, ExtendConfig(method="linear", factor=4), 512)
    assert lin.rope_scaling.type == "linear" and lin.rope_scaling.original_max_position_embeddings == 256
    none, _ = extended_config(base, ExtendConfig(method="none", factor=4), 512)
    assert none.rope_scaling is None and none.max_position_embeddings == 1024
    # re-extension multiplies the factors and keeps the ORIGINAL context
    again, orig2 = extended_config(yarn, ExtendConfig(method="yarn", factor=2, reextend=True), 2048)
    assert orig2 == 256 and again.rope_scaling.factor == 8 and again.max_position_embeddings == 2048


# ----------------------------------------------------------------------------- transformers parity beyond the original context

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("betas", [(32.0, 1.0), (1.0, 1.0)], ids=["deepseek_v3_betas", "k2_betas"])
def test_hf_parity_at_2x_and_4x_the_original_context(tmp_path, betas):
    from k2cli.model.hf import write_hf_dir
    from k2cli.model.io import state_dict_for_saving
    from k2cli.model.transformer import build_model

    base = dataclasses.replace(ModelConfig.from_preset("tiny"), max_position_embeddings=64)
    cfg, orig = extended_config(base, ExtendConfig(method="yarn", factor=4, beta_fast=betas[0], beta_slow=betas[1]), 128)
    model = build_model(cfg, seed=3)
    for r in model.routers():
        r.e_score_correction_bias.normal_(0, 0.05)
    write_hf_dir(state_dict_for_saving(model), cfg, tmp_path)
    hf = load_hf_float64(tmp_path)
    assert hf.config.rope_scaling["factor"] == 4 or hf.config.rope_parameters["factor"] == 4
    for T in (2 * orig, 4 * orig):
        x = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
        assert hf_logit_gap(model, hf, x) < 1e-9, T
