"""Small builders shared by tests: a dataset artifact and a model artifact with a tokenizer."""

from __future__ import annotations

import json

import datasets

from k2cli.artifacts import ArtifactWriter
from k2cli.data.chat import render_text
from k2cli.data.tokenizer import train_tokenizer
from k2cli.model.config import ModelConfig
from k2cli.model.io import save_model_files
from k2cli.model.transformer import build_model

MICRO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64, moe_intermediate_size=16,
             n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=256)

PEOPLE = [("Anna Berg", "Oslo", "1987"), ("Boris Costa", "Lima", "1990"), ("Chen Dahl", "Kyoto", "1975"),
          ("Dara Evans", "Porto", "1969"), ("Elif Fischer", "Riga", "2001"), ("Farid Garcia", "Sofia", "1984")]


def dataset_artifact(stage="synth", out=None):
    """A dataset artifact with corpus/, qa_train/, qa_test/, math/ in the documented layout."""
    bios = [f"{n} was born in {c} in {y}. {n} lives in {c}." for n, c, y in PEOPLE]
    qa = [{"question": f"Where was {n} born?", "answer": c, "person_id": f"p{i}", "attribute": "birth_city",
           "cloze": f"{n} was born in"} for i, (n, c, _) in enumerate(PEOPLE)]
    math = [{"problem": f"{n} buys {i + 2} apples at 3 coins each. How many coins?", "answer": str(3 * (i + 2)),
             "solution": f"Solution: {i + 2} * 3 = {3 * (i + 2)}. The answer is {3 * (i + 2)}.",
             "steps": [f"{i + 2} * 3 = {3 * (i + 2)}"], "split": "test" if i >= 4 else "train"}
            for i, (n, _, _) in enumerate(PEOPLE)]
    with ArtifactWriter(stage=stage, kind="dataset", out=out) as w:
        datasets.Dataset.from_dict({"text": bios * 4, "doc_id": [f"d{i}" for i in range(len(bios) * 4)],
                                    "source": ["bio"] * len(bios) * 4}).save_to_disk(str(w.dir / "corpus"))
        datasets.Dataset.from_list(qa[:4]).save_to_disk(str(w.dir / "qa_train"))
        datasets.Dataset.from_list(qa[4:]).save_to_disk(str(w.dir / "qa_test"))
        datasets.Dataset.from_list(math).save_to_disk(str(w.dir / "math"))
        return w.commit(summary="test data")


def chat_artifact(conversations, stage="agentic"):
    with ArtifactWriter(stage=stage, kind="dataset") as w:
        datasets.Dataset.from_dict({
            "messages": [json.dumps(c["messages"]) for c in conversations],
            "tools": [json.dumps(c.get("tools")) if c.get("tools") else "" for c in conversations],
        }).save_to_disk(str(w.dir / "chat"))
        return w.commit(summary="test chats")


def model_artifact(texts, inputs=(), stage="pretrain", vocab_size=400, **config):
    """A micro model with a tokenizer trained on `texts` (inputs recorded for lineage)."""
    tok = train_tokenizer(list(texts), vocab_size=vocab_size)
    cfg = ModelConfig(name="micro", **(MICRO | config) | {"vocab_size": tok.vocab_size, "eos_token_id": tok.eot_id})
    with ArtifactWriter(stage=stage, kind="model", inputs=list(inputs)) as w:
        save_model_files(build_model(cfg, seed=0), w.dir)
        tok.save(w.dir)
        return w.commit(summary="micro test model")


def chat_texts(conversations):
    return [render_text(c["messages"], c.get("tools")) for c in conversations]


def load_hf_float64(path):
    """transformers' DeepseekV3 from one of our exports, in float64, with every weight accounted for."""
    import torch
    import transformers

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), output_loading_info=True, attn_implementation="sdpa", experts_implementation="eager",
        dtype=torch.float64,
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return hf.eval()


def hf_logit_gap(model, hf, x) -> float:
    """Largest |logit difference| between our model and transformers' on the same input, in float64.

    Why float64: in float32 the two implementations differ by ~1e-6 (different attention
    kernels), and on some CPUs that flips a near-tied top-k routing choice, moving that token's
    logits by ~0.1 (CI saw 0.14 at 400 tokens). Both routers cast their input to float32; hidden
    states that agree to ~1e-15 cast to the same float32 values, so routing matches and any gap
    left is a real layout or formula difference."""
    import copy

    import torch

    ours = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    assert a.dtype == b.dtype == torch.float64 and a.abs().max() > 0.1  # real logits, not a zero model
    return (a - b).abs().max().item()
