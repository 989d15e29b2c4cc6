"""Hugging Face DeepseekV3 interop: transformers loads our export and computes the same logits."""

import dataclasses
import json

import pytest
import torch

from k2cli.model.config import RopeScaling
from k2cli.model.hf import from_hf_state_dict, write_hf_dir
from k2cli.model.hf_checkpoint import read_hf_config, read_hf_weights
from k2cli.model.io import load_model, state_dict_for_saving
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
    """A model created and saved by transformers itself imports and matches (MTP layers: test_import_hf.py)."""
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
    model, _ = load_model(tmp_path / "imported")
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(40))
    assert hf_logit_gap(model, load_hf_float64(tmp_path / "hf"), x) < 1e-9


# ----------------------------------------------------------------------------- k2 export (CLI)

CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Where was Anna Berg born?"},
        {"role": "assistant", "content": "In Oslo."}, {"role": "user", "content": "And Boris Costa?"}]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Find a person.",
                                           "parameters": {"type": "object", "properties": {"name": {"type": "string"}}}}}]


def chat_model_artifact(end_of_turn_first: bool):
    """A micro chat model with k2's tokenizer. With `end_of_turn_first` its weights are set so that
    every next token is <|im_end|>: embeddings carry a large constant in dimension 0, the final norm
    keeps only that dimension, and lm_head reads it only into <|im_end|>'s logit."""
    from helpers import MICRO, PEOPLE

    from k2cli.artifacts import ArtifactWriter
    from k2cli.data.tokenizer import train_tokenizer
    from k2cli.model.config import ModelConfig
    from k2cli.model.io import save_model_files

    tok = train_tokenizer([f"{n} was born in {c} in {y}." for n, c, y in PEOPLE] * 4, vocab_size=400)
    cfg = ModelConfig(name="micro", **MICRO | {"vocab_size": tok.vocab_size, "eos_token_id": tok.eot_id})
    model = build_model(cfg, seed=0)
    if end_of_turn_first:
        with torch.no_grad():
            model.embed_tokens.weight[:, 0] = 50.0
            model.norm.weight.zero_()
            model.norm.weight[0] = 1.0
            model.lm_head.weight.zero_()
            model.lm_head.weight[tok.token_id("<|im_end|>"), 0] = 1.0
    with ArtifactWriter(stage="sft", kind="model") as w:
        save_model_files(model, w.dir)
        tok.save(w.dir)
        return w.commit(summary="micro chat model"), tok


def test_export_stops_at_the_end_of_turn_token(k2, tmp_path):
    """transformers' generate on the export stops at <|im_end|> (it ran on with eos = <|endoftext|> only)."""
    art, tok = chat_model_artifact(end_of_turn_first=True)
    out = tmp_path / "hf"
    k2("export", art.path, "--format", "hf", "--out", out)
    im_end, eot = tok.token_id("<|im_end|>"), tok.eot_id
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out / name).read_text())["eos_token_id"] == [eot, im_end], name

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    prompt = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"]
    with torch.no_grad():
        stopped = hf.generate(ids, attention_mask=prompt["attention_mask"], max_new_tokens=8, do_sample=False)
        ran_on = hf.generate(ids, attention_mask=prompt["attention_mask"], max_new_tokens=8, do_sample=False,
                             eos_token_id=eot)
    assert stopped[0, ids.shape[1]:].tolist() == [im_end]
    assert ran_on[0, ids.shape[1]:].tolist() == [im_end] * 8  # the control: the old eos never comes


def test_exported_tokenizer_matches_k2_and_files_are_shared(k2, tmp_path):
    """AutoTokenizer loads the export, apply_chat_template gives k2's ids; files 0644, dirs 0755; --dtype bf16."""
    import os
    import stat

    from safetensors import safe_open

    from k2cli.data.chat import render

    art, tok = chat_model_artifact(end_of_turn_first=False)
    out = tmp_path / "hf"
    k2("export", art.path, "--out", out, "--dtype", "bf16")
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= modes.keys()
    assert set(modes.values()) == {0o644}, modes

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    conv = CHAT + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "functions.lookup:0", "type": "function", "function": {"name": "lookup", "arguments": {"name": "Boris Costa"}}}]},
        {"role": "tool", "tool_call_id": "functions.lookup:0", "content": "Lima"}]
    theirs = hf_tok.apply_chat_template(conv, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert theirs == render(tok, conv, TOOLS, add_generation_prompt=True).ids

    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes.pop("model.layers.1.mlp.gate.e_score_correction_bias") == "F32"  # routing keeps full precision
    assert set(dtypes.values()) == {"BF16"}
    model, _ = load_model(art.path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    x = torch.tensor([theirs])
    with torch.no_grad():
        gap = (model(x) - hf(x).logits).abs().max().item()
    assert 0 < gap < 0.05  # bf16 storage: close to the fp32 model, not bit-identical
