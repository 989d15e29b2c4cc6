"""Hugging Face DeepseekV3 interop: the state-dict adapter, config mapping, export, import.

The exported directory is what `DeepseekV3ForCausalLM.save_pretrained` writes and what
transformers, vLLM, SGLang and lm-evaluation-harness load: `config.json` plus safetensors
with per-expert keys. Our module names already mirror HF's, so the adapter only

  * adds the `model.` prefix (everything but `lm_head`),
  * splits our fused expert tensors into per-expert matrices (and joins them back),
  * maps the config (q_lora_rank 0 <-> null, rope scaling, NTK as a rescaled rope_theta).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from k2cli.errors import K2Error
from k2cli.model.config import ModelConfig, RopeScaling

EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
FUSED_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
HF_MODEL_TYPES = ("deepseek_v3", "kimi_k2")


# ----------------------------------------------------------------------------- config


def to_hf_config(cfg: ModelConfig) -> dict:
    rope_theta = cfg.rope_theta
    rope_scaling = None
    rs = cfg.rope_scaling
    if rs is not None and rs.type == "ntk":
        # NTK-aware scaling is a larger rotary base and nothing else: HF's default rope does it.
        d = cfg.qk_rope_head_dim
        rope_theta = cfg.rope_theta * rs.factor ** (d / (d - 2)) if d > 2 else cfg.rope_theta * rs.factor
    elif rs is not None and rs.type == "linear":
        rope_scaling = {"type": "linear", "rope_type": "linear", "factor": rs.factor}
    elif rs is not None:
        rope_scaling = {
            "type": "yarn",
            "rope_type": "yarn",
            "factor": rs.factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
            "beta_fast": rs.beta_fast,
            "beta_slow": rs.beta_slow,
            "mscale": rs.mscale,
            "mscale_all_dim": rs.mscale_all_dim,
        }
    out = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "n_shared_experts": cfg.n_shared_experts,
        "n_routed_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank or None,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": cfg.norm_topk_prob,
        "first_k_dense_replace": cfg.first_k_dense_replace,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "rope_interleave": True,
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "num_nextn_predict_layers": 0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    return out


def from_hf_config(hf: dict, source: str = "config.json") -> ModelConfig:
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type not in HF_MODEL_TYPES and "DeepseekV3ForCausalLM" not in archs:
        raise K2Error(
            f"{source} describes a '{model_type or archs}' model, not DeepseekV3",
            "k2 imports DeepseekV3ForCausalLM checkpoints (DeepSeek-V3, Kimi K2 layout)",
        )
    if hf.get("attention_bias"):
        raise K2Error(f"{source}: attention_bias=true is not supported", "k2 models have no attention biases")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    rtype = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rtype == "yarn":
        scaling = RopeScaling(
            type="yarn",
            factor=float(rope["factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            beta_fast=float(rope.get("beta_fast") or 32),
            beta_slow=float(rope.get("beta_slow") or 1),
            mscale=float(rope.get("mscale") or 0),
            mscale_all_dim=float(rope.get("mscale_all_dim") or 0),
        )
    elif rtype == "linear":
        scaling = RopeScaling(type="linear", factor=float(rope["factor"]))
    elif rtype not in ("default", None):
        raise K2Error(f"{source}: rope type '{rtype}' is not supported", "k2 supports default, linear and yarn")
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    cfg = ModelConfig(
        name=hf.get("_name_or_path") or "imported",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        n_routed_experts=hf.get("n_routed_experts") or 0,
        num_experts_per_tok=hf.get("num_experts_per_tok") or 1,
        n_shared_experts=hf.get("n_shared_experts") or 0,
        n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1,
        first_k_dense_replace=hf.get("first_k_dense_replace", 0),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        max_position_embeddings=hf["max_position_embeddings"],
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=hf.get("pad_token_id"),
    )
    return cfg.validate()


# ----------------------------------------------------------------------------- weights


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our keys -> HF on-disk keys (per-expert matrices)."""
    out = {}
    I = cfg.moe_intermediate_size
    for key, t in sd.items():
        if key == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out[key] = t
            continue
        hf_key = "model." + key
        m = FUSED_KEY.match(hf_key)
        if m is None:
            out[hf_key] = t
            continue
        prefix = hf_key.rsplit(".", 1)[0]  # model.layers.N.mlp.experts
        for e in range(t.shape[0]):
            if m.group(2) == "gate_up_proj":
                out[f"{prefix}.{e}.gate_proj.weight"] = t[e, :I].contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = t[e, I:].contiguous()
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = t[e].contiguous()
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF keys (per-expert on disk, or fused as transformers 5 holds them in memory) -> ours.

    Returns (state dict, ignored keys): multi-token-prediction layers beyond
    num_hidden_layers (DeepSeek-V3 ships one) are ignored, and reported.
    """
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    ignored = []
    for key, t in sd.items():
        m = LAYER_KEY.match(key)
        if m and int(m.group(1)) >= cfg.num_hidden_layers:
            ignored.append(key)
            continue
        if key.endswith("rotary_emb.inv_freq"):
            ignored.append(key)
            continue
        m = EXPERT_KEY.match(key)
        if m:
            experts.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = t
            continue
        if key == "lm_head.weight":
            out[key] = t
        elif key.startswith("model."):
            out[key[len("model.") :]] = t
        else:
            ignored.append(key)
    E = cfg.n_routed_experts
    layers = sorted({layer for layer, _ in experts})
    for layer in layers:
        parts = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            got = experts.get((layer, proj), {})
            if sorted(got) != list(range(E)):
                raise K2Error(
                    f"layer {layer}: expected {E} experts' {proj}, found {len(got)}",
                    "the checkpoint is incomplete or its config does not match its weights",
                )
            parts[proj] = torch.stack([got[e] for e in range(E)])
        base = f"layers.{layer}.mlp.experts"
        out[f"{base}.gate_up_proj"] = torch.cat((parts["gate_proj"], parts["up_proj"]), dim=1)
        out[f"{base}.down_proj"] = parts["down_proj"]
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out, ignored


# ----------------------------------------------------------------------------- directories


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd = {}
            for name in files:
                sd.update(load_file(str(directory / name)))
            return sd
        single = directory / "model.safetensors"
        if single.is_file():
            return load_file(str(single))
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise K2Error(f"cannot read the weights in {directory}: {e}", "the checkpoint is damaged")
    if list(directory.glob("*.bin")):
        raise K2Error(f"{directory} holds PyTorch .bin weights", "re-save it with safe_serialization=True")
    raise K2Error(f"{directory} has no safetensors weights", "pass a directory written by save_pretrained")


def read_hf_config(directory: Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise K2Error(f"not a directory: {directory}", "pass a Hugging Face model directory")
    if not path.is_file():
        raise K2Error(f"{directory} has no config.json", "pass a Hugging Face model directory")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise K2Error(f"corrupt {path}: {e}", "pass a valid Hugging Face model directory")
    try:
        return from_hf_config(hf, str(path))
    except KeyError as e:
        raise K2Error(f"{path} lacks the field {e}", "pass a DeepseekV3 config.json")


def write_hf_dir(sd: dict[str, torch.Tensor], cfg: ModelConfig, directory: Path) -> None:
    directory = Path(directory)
    (directory / "config.json").write_text(json.dumps(to_hf_config(cfg), indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    hf_sd = to_hf_state_dict(sd, cfg)
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(directory / "model.safetensors"), metadata={"format": "pt"})
