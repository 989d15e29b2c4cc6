"""Hugging Face DeepseekV3 interop: transformers loads our export and computes the same logits."""

import dataclasses
import json

import pytest
import torch

from k2cli.model.config import RopeScaling
from k2cli.model.hf import from_hf_state_dict, write_hf_dir
from k2cli.model.hf_checkpoint import read_hf_config, read_hf_weights
from k2cli.model.io import state_dict_for_saving
from k2cli.model.transformer import build_model

from helpers import hf_logit_gap, load_hf_float64

transformers = pytest.importorskip("transformers")


def export(model, path):
    path.mkdir(parents=True, exist_ok=True)
    write_hf_dir(state_dict_for_saving(model), model.config, path)
    return path


VARIANTS = {
    "tiny": ({}, 48),
    "q_lora_off": ({"q_lora_rank": 0}, 48),
    "routing_groups": (
        {"n_routed_experts": 16, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 4, "routed_scaling_factor": 2.5},
        48,
    ),
    "yarn_ds_v3_betas": ({"rope_scaling": RopeScaling(factor=4, original_max_position_embeddings=64)}, 256),
    "yarn_k2_betas": (
        {"rope_scaling": RopeScaling(factor=4, original_max_position_embeddings=64, beta_fast=1, beta_slow=1)},
        512,
    ),
    "linear": ({"rope_scaling": RopeScaling(type="linear", factor=2, original_max_position_embeddings=128)}, 300),
    "ntk": ({"rope_scaling": RopeScaling(type="ntk", factor=2, original_max_position_embeddings=128)}, 300),
    "beyond_context": ({}, 400),  # tiny's context is 256
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_matches_k2_logits(tiny_cfg, tmp_path, name):
    change, T = VARIANTS[name]
    cfg = dataclasses.replace(tiny_cfg, **change)
    model = build_model(cfg, seed=11)
    for r in model.routers():  # a non-trivial correction bias must travel too
        r.e_score_correction_bias.normal_(0, 0.05)
    hf = load_hf_float64(export(model, tmp_path / name))
    x = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
    assert hf_logit_gap(model, hf, x) < 1e-9


def test_parity_would_catch_a_wrong_layout(tiny_cfg, tmp_path):
    """Negative control: swapping the rope pair layout must break parity."""
    model = build_model(tiny_cfg, seed=12)
    sd = state_dict_for_saving(model)
    key = "layers.0.self_attn.kv_a_proj_with_mqa.weight"
    r = tiny_cfg.kv_lora_rank
    w = sd[key].clone()
    rope = w[r:]
    w[r:] = torch.cat((rope[0::2], rope[1::2]))  # a half-split layout instead of interleaved pairs
    sd[key] = w
    (tmp_path / "bad").mkdir()
    write_hf_dir(sd, tiny_cfg, tmp_path / "bad")
    hf = load_hf_float64(tmp_path / "bad")
    x = torch.randint(0, tiny_cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(64))
    assert hf_logit_gap(model, hf, x) > 1e-3


def test_exported_config_and_on_disk_layout(tiny_cfg, tmp_path):
    export(build_model(tiny_cfg), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    keys = read_hf_weights(tmp_path).keys()
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in keys  # per-expert, as save_pretrained writes
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys


def test_import_round_trips_bit_exactly(tiny_cfg, tmp_path):
    model = build_model(tiny_cfg, seed=13)
    for r in model.routers():
        r.e_score_correction_bias.normal_(0, 0.1)
    export(model, tmp_path)
    cfg = read_hf_config(tmp_path)
    assert cfg.to_dict() | {"name": "tiny"} == tiny_cfg.to_dict()
    sd, ignored = from_hf_state_dict(read_hf_weights(tmp_path), cfg)
    assert not ignored
    original = state_dict_for_saving(model)
    assert sd.keys() == original.keys()
    for k in sd:
        assert torch.equal(sd[k], original[k]), k


def test_import_of_a_checkpoint_saved_by_transformers(tmp_path, k2):
    """A model created and saved by transformers itself (with an MTP layer) imports and matches."""
    config = transformers.DeepseekV3Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(config).eval()
    for layer in hf.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    k2("import-hf", tmp_path / "hf", "--out", tmp_path / "imported")
    from k2cli.model.io import load_model

    model, _ = load_model(tmp_path / "imported")
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(40))
    assert hf_logit_gap(model, load_hf_float64(tmp_path / "hf"), x) < 1e-9
