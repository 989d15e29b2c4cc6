"""Hugging Face DeepseekV3 interop: the state-dict adapter, config mapping, export, import.

The exported directory is what `DeepseekV3ForCausalLM.save_pretrained` writes and what
transformers, vLLM, SGLang and lm-evaluation-harness load: `config.json` plus safetensors
with per-expert keys. Our module names already mirror HF's, so the adapter only

  * adds the `model.` prefix (everything but `lm_head`),
  * splits our fused expert tensors into per-expert matrices (and joins them back),
  * maps the config (q_lora_rank 0 <-> null, rope scaling, NTK as a rescaled rope_theta).

Reading checkpoint directories (shards, FP8 scales) lives in `hf_checkpoint.py`; this module
is the format: config fields, tensor names and shapes, and what an export writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from k2cli.errors import K2Error
from k2cli.model.config import ModelConfig, RopeScaling

EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
FUSED_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
HF_MODEL_TYPES = ("deepseek_v3", "kimi_k2")
HF_ARCHITECTURE = "DeepseekV3ForCausalLM"
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


# ----------------------------------------------------------------------------- config


def to_hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32, eos_token_ids: list[int] | None = None) -> dict:
    """config.json for transformers. `eos_token_ids`: every token that ends a generation (the
    model's end-of-text and its chat template's end-of-turn); a list when there are several."""
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
        "eos_token_id": _one_or_list(eos_token_ids) if eos_token_ids else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": TORCH_DTYPE_NAMES[dtype],
        "dtype": TORCH_DTYPE_NAMES[dtype],
        "use_cache": True,
    }
    return out


def _one_or_list(ids: list[int]):
    return ids[0] if len(ids) == 1 else list(ids)


def from_hf_config(hf: dict, source: str = "config.json") -> ModelConfig:
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    supported = f"k2 imports {HF_ARCHITECTURE} checkpoints (model_type {' or '.join(HF_MODEL_TYPES)}: DeepSeek-V3, Kimi K2)"
    if model_type not in HF_MODEL_TYPES and HF_ARCHITECTURE not in archs:
        found = f"model_type '{model_type}'" + (f" ({', '.join(map(str, archs))})" if archs else "")
        if isinstance(hf.get("text_config"), dict):
            found += f" with a nested text_config (model_type '{hf['text_config'].get('model_type')}')"
        raise K2Error(f"{source} describes a {found} model, which k2 cannot import", supported)
    if hf.get("attention_bias"):
        raise K2Error(f"{source}: attention_bias=true is not supported", "k2 models have no attention biases")
    # Variants of the DeepseekV3 class k2's model does not compute (DeepSeek-V2's softmax routing, ...).
    for field_, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("hidden_act", "silu"), ("moe_layer_freq", 1)):
        if hf.get(field_, want) != want:
            raise K2Error(f"{source}: {field_}={hf[field_]!r} is not supported", f"k2's MoE model has {field_}={want!r}")
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


def ignored_key(key: str, cfg: ModelConfig) -> bool:
    """Tensors an import leaves out: layers beyond num_hidden_layers (DeepSeek-V3's multi-token-
    prediction layer 61) and rotary caches some old checkpoints store."""
    m = LAYER_KEY.match(key)
    return bool(m and int(m.group(1)) >= cfg.num_hidden_layers) or key.endswith("rotary_emb.inv_freq")


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Our state-dict keys -> shapes, from the model built on the meta device (nothing allocated)."""
    from k2cli.model.transformer import K2Model

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in K2Model(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def from_hf_state_dict(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    cfg: ModelConfig,
    dtype: torch.dtype | None = None,
    source: str = "the checkpoint",
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF keys (per-expert on disk, or fused as transformers 5 holds them in memory) -> ours.

    `tensors` may be a dict or a stream of (key, tensor) pairs (one shard at a time): each
    per-expert matrix is copied straight into its slot of the fused [E, ...] tensor, so the
    output is the only full copy. Every tensor's shape is checked against the config.
    `dtype` casts matrices (None keeps each tensor's own); vectors (norms, router bias) are
    kept in float32. Returns (state dict, ignored keys).
    """
    want = expected_shapes(cfg)
    I, E = cfg.moe_intermediate_size, cfg.n_routed_experts
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, torch.Tensor] = {}  # fused [E, ...] tensors being filled expert by expert
    filled: dict[tuple[int, str], set[int]] = {}
    ignored, unknown = [], []
    for key, t in tensors.items() if isinstance(tensors, Mapping) else tensors:
        if ignored_key(key, cfg):
            ignored.append(key)
            continue
        m = EXPERT_KEY.match(key)
        if m:  # one expert's matrix -> its slot in the fused tensor
            layer, e, proj = int(m.group(1)), int(m.group(2)), m.group(3)
            fused = f"layers.{layer}.mlp.experts.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
            if fused not in want or e >= E:
                unknown.append(key)
                continue
            if fused not in experts:
                experts[fused] = torch.empty(want[fused], dtype=dtype or t.dtype)
            w = experts[fused]
            slot = {"gate_proj": w[e, :I], "up_proj": w[e, I:], "down_proj": w[e]}[proj]
            _check_shape(key, t, slot.shape, source)
            slot.copy_(t)
            filled.setdefault((layer, proj), set()).add(e)
            continue
        ours = key[len("model.") :] if key.startswith("model.") else key
        if ours not in want:
            if not (key == "lm_head.weight" and cfg.tie_word_embeddings):
                unknown.append(key)
            continue
        _check_shape(key, t, want[ours], source)
        out[ours] = t if dtype is None else t.to(dtype if t.dim() >= 2 else torch.float32)
    if unknown:
        raise K2Error(
            f"{source} has {len(unknown)} tensors that are not part of a DeepseekV3 model with its config.json "
            f"(e.g. {', '.join(unknown[:3])})",
            "the checkpoint's config.json does not describe its weights",
        )
    out |= {k: v for k, v in experts.items() if k not in out}
    missing = []
    for key in want:
        m = FUSED_KEY.match("model." + key)
        if m is None or key not in experts:  # (a fused tensor may also come whole, as transformers 5 holds it)
            if key not in out:
                missing.append("model." + key if key != "lm_head.weight" else key)
            continue
        layer = int(m.group(1))
        for proj in ("gate_proj", "up_proj") if m.group(2) == "gate_up_proj" else ("down_proj",):
            missing += [f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
                        for e in sorted(set(range(E)) - filled.get((layer, proj), set()))]
    if missing:
        raise K2Error(
            f"{source} lacks {len(missing)} tensors its config.json needs (e.g. {', '.join(missing[:3])})",
            "the checkpoint is incomplete, or its config.json does not match its weights",
        )
    return out, ignored


def _check_shape(key: str, t: torch.Tensor, want: torch.Size, source: str) -> None:
    if tuple(t.shape) != tuple(want):
        raise K2Error(
            f"tensor '{key}' in {source} has shape {list(t.shape)}, but config.json implies {list(want)}",
            "the checkpoint's config.json does not match its weights",
        )


# ----------------------------------------------------------------------------- directories


def write_hf_dir(
    sd: dict[str, torch.Tensor],
    cfg: ModelConfig,
    directory: Path,
    dtype: torch.dtype = torch.float32,
    eos_token_ids: list[int] | None = None,
    generation: dict | None = None,
) -> None:
    """config.json + generation_config.json + model.safetensors, as save_pretrained writes them.

    `dtype` is the storage type of the weights; the router's correction bias stays float32,
    as in DeepSeek-V3's and Kimi K2's own checkpoints (it decides routing by small margins).
    `generation`: defaults to keep (a checkpoint's own generation_config.json)."""
    directory = Path(directory)
    eos = list(eos_token_ids or ([cfg.eos_token_id] if cfg.eos_token_id is not None else []))
    (directory / "config.json").write_text(json.dumps(to_hf_config(cfg, dtype, eos), indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id, "do_sample": False}
    gen |= dict(generation or {}) | {"eos_token_id": _one_or_list(eos) if eos else None}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    hf_sd = {k: v.to(torch.float32 if k.endswith("e_score_correction_bias") else dtype).contiguous()
             for k, v in to_hf_state_dict(sd, cfg).items()}
    save_file(hf_sd, str(directory / "model.safetensors"), metadata={"format": "pt"})


PROBE = "k2 end-of-turn probe"


def stop_token_ids(directory: Path, cfg: ModelConfig) -> tuple[list[int], dict, str | None]:
    """The tokens that end a generation of the model whose tokenizer files are in `directory`.

    They are the model's end of text (config eos), the eos of a carried generation_config.json,
    the tokenizer's eos, and the token(s) the chat template closes an assistant turn with: the
    template (transformers' apply_chat_template, so exactly what users of the export will run)
    renders a probe conversation, and the special token right after the assistant's text is the
    end of turn (`<|im_end|>` for k2's and Kimi K2's templates, `<|eot_id|>` for Llama 3's ...).

    Returns (ids, the carried generation config without its eos, a note when something could
    not be read)."""
    directory = Path(directory)
    ids = [cfg.eos_token_id] if cfg.eos_token_id is not None else []
    generation = {}
    path = directory / "generation_config.json"
    if path.is_file():
        try:
            generation = json.loads(path.read_text())
            ids += _as_list(generation.pop("eos_token_id", None))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            generation = {}
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tiktoken.model")):
        return _unique(ids), generation, None
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        tok = transformers.AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)  # never run its code
    except ImportError:
        return _unique(ids), generation, "install transformers (pip install 'k2cli[hf]') so export can find the chat template's end-of-turn token"
    except Exception as e:  # a tokenizer that needs remote code, a damaged file: keep what we have
        why = "it needs the checkpoint's Python code" if "custom code" in str(e) else str(e).splitlines()[0][:120]
        return _unique(ids), generation, (f"transformers cannot load the tokenizer on its own ({why}), so the chat "
                                          f"template's end of turn is not known; stop tokens are {_unique(ids)}")
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    end_of_turn = None
    if getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template(
                [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE}], tokenize=False
            )
            after = tok.encode(text.split(PROBE, 1)[1], add_special_tokens=False) if PROBE in text else []
            special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
            end_of_turn = after[0] if after and after[0] in special else None
        except Exception:  # a template that rejects the probe: keep what we have
            end_of_turn = None
    if end_of_turn is not None:
        ids.append(end_of_turn)
    note = None if end_of_turn is not None or not getattr(tok, "chat_template", None) else (
        "the chat template's end-of-turn token could not be found; generation stops at " + str(_unique(ids)))
    return _unique(ids), generation, note


def _as_list(x) -> list[int]:
    return [int(i) for i in x] if isinstance(x, list) else ([int(x)] if isinstance(x, int) else [])


def _unique(ids: list[int]) -> list[int]:
    return list(dict.fromkeys(ids))
