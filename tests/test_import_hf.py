"""k2 import-hf on checkpoints laid out as published: DeepSeek-V3 (sharded, an MTP layer, its own
tokenizer), Kimi K2 (FP8 weights in 128x128 blocks, a tiktoken tokenizer, remote code), memory
bounded by one shard plus the output, and one clear line for what cannot be imported."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_clean_error
from helpers import hf_logit_gap, load_hf_float64
from k2cli.model.config import ModelConfig
from k2cli.model.hf import from_hf_state_dict, to_hf_config, to_hf_state_dict
from k2cli.model.hf_checkpoint import dequantize_fp8
from k2cli.model.io import load_model, read_config, state_dict_for_saving
from k2cli.model.transformer import build_model

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
             first_k_dense_replace=1, max_position_embeddings=128)
# Kimi K2's shape in miniature, with dimensions that are not multiples of 128 so FP8 blocks have edges:
# hidden 160 = 128 + 32, kv_a_proj_with_mqa 64 + 16 = 80 rows, intermediate 192 = 128 + 64.
KIMI = dict(vocab_size=300, hidden_size=160, intermediate_size=192, moe_intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=2, q_lora_rank=144, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
            v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
            first_k_dense_replace=1, routed_scaling_factor=2.827, max_position_embeddings=128)
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
LINEAR = re.compile(r"^model\.layers\.\d+\..*(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


def hf_model(shape: dict, seed: int = 0):
    torch.manual_seed(seed)
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**shape)).eval()
    for layer in hf.model.layers[shape["first_k_dense_replace"]:]:
        layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return hf


def saved(hf, directory):
    """(tensors as save_pretrained writes them: per-expert keys, config.json as a dict)."""
    hf.save_pretrained(directory)
    return load_file(str(directory / "model.safetensors")), json.loads((directory / "config.json").read_text())


def write_checkpoint(directory, tensors: dict, config: dict, shards: list[list[str]]):
    """A sharded checkpoint: model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in keys}, str(directory / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in keys}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))


def blocks(shape, block):
    """(row slice, column slice, i, j) of every block, the edge ones partial."""
    (R, C), (bm, bn) = shape, block
    return [(slice(i, i + bm), slice(j, j + bn), i // bm, j // bn) for i in range(0, R, bm) for j in range(0, C, bn)]


def quantize(w, block=(128, 128)):
    """float8_e4m3fn per block with scale_inv = amax / 448, as DeepSeek-V3 and Kimi K2 ship."""
    R, C = w.shape
    scale = torch.empty(-(-R // block[0]), -(-C // block[1]))
    q = torch.empty(R, C, dtype=torch.float8_e4m3fn)
    for rows, cols, i, j in blocks(w.shape, block):
        scale[i, j] = w[rows, cols].abs().max().clamp(min=1e-12) / 448
        q[rows, cols] = (w[rows, cols] / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_by_blocks(q, scale, block=(128, 128)):
    """The reference: one block at a time, no padding."""
    out = torch.empty(q.shape)
    for rows, cols, i, j in blocks(q.shape, block):
        out[rows, cols] = q[rows, cols].float() * scale[i, j]
    return out


@pytest.mark.parametrize("shape,block", [((200, 300), (128, 128)), ((576, 130), (128, 128)), ((5, 7), (128, 128)),
                                         ((100, 70), (32, 48))])
def test_fp8_dequantize_handles_edge_blocks(shape, block):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])) * torch.logspace(-3, 1, shape[1])
    q, scale = quantize(w, block)
    got = dequantize_fp8(q, scale, block, "w")
    assert torch.equal(got, dequantize_by_blocks(q, scale, block))
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 of the value; below 2^-6 x scale the step is 2^-9 x scale.
    s = scale.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]
    assert ((got - w).abs() <= w.abs() * 2**-4 + s * 2**-10 + 1e-12).all()
    assert (got != w).any()


# ----------------------------------------------------------------------------- DeepSeek-V3 layout


def users_tokenizer(directory):
    """A user's own BPE tokenizer: its own special tokens and chat template, saved by transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world", "the cat sat on the mat"] * 20, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<s>", "</s>", "<|start|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                  additional_special_tokens=["<|start|>", "<|end|>"])
    hf_tok.chat_template = ("{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")
    hf_tok.save_pretrained(directory)
    return hf_tok


def test_deepseek_v3_sharded_checkpoint_with_mtp_layer_and_own_tokenizer(k2, tmp_path, monkeypatch):
    """Shards saved by transformers + DeepSeek-V3's extra multi-token-prediction layer (skipped, said so);
    logits match transformers; the tokenizer files arrive byte for byte and the export stops at <|end|>."""
    hf = hf_model(SMALL)
    src = tmp_path / "ds"
    hf.save_pretrained(src, max_shard_size="100KB")
    hf_tok = users_tokenizer(src)
    hf.save_pretrained(tmp_path / "reference")  # the same model, without the MTP layer, for transformers
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    # DeepSeek-V3 ships layer 61 (= num_hidden_layers) as its MTP module: a full layer plus enorm, hnorm, eh_proj, shared_head.
    last = SMALL["num_hidden_layers"] - 1
    layer = {k.replace(f"layers.{last}.", f"layers.{last + 1}."): v for k, v in hf.state_dict().items() if f"layers.{last}." in k}
    H = SMALL["hidden_size"]
    mtp = {k: v.clone() for k, v in layer.items() if "experts.gate_up_proj" not in k and "experts.down_proj" not in k}
    mtp |= {f"model.layers.{last + 1}.enorm.weight": torch.ones(H), f"model.layers.{last + 1}.hnorm.weight": torch.ones(H),
            f"model.layers.{last + 1}.eh_proj.weight": torch.randn(H, 2 * H),
            f"model.layers.{last + 1}.shared_head.norm.weight": torch.ones(H)}
    save_file(mtp, str(src / "model-mtp.safetensors"))
    index["weight_map"] |= {k: "model-mtp.safetensors" for k in mtp}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((src / "config.json").read_text()) | {"num_nextn_predict_layers": 1}
    (src / "config.json").write_text(json.dumps(config))

    monkeypatch.delenv("K2_QUIET")  # the notes are the point
    result = k2("import-hf", src, "--out", tmp_path / "imported")
    assert f"skipped {len(mtp)} tensors of layers [{last + 1}]" in " ".join(result.output.split())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "imported" / name).read_bytes() == (src / name).read_bytes()
    model, _ = load_model(tmp_path / "imported")
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(40))
    assert hf_logit_gap(model, load_hf_float64(tmp_path / "reference"), x) < 1e-9

    k2("export", tmp_path / "imported", "--out", tmp_path / "export")
    specials = {t: hf_tok.convert_tokens_to_ids(t) for t in ("</s>", "<|end|>")}
    assert json.loads((tmp_path / "export" / "generation_config.json").read_text())["eos_token_id"] == [
        specials["</s>"], specials["<|end|>"]]  # the tokenizer's eos and the template's end of turn
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the cat"}]
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert exported.apply_chat_template(chat, tokenize=True, return_dict=False) == hf_tok.apply_chat_template(
        chat, tokenize=True, return_dict=False)


# ----------------------------------------------------------------------------- Kimi K2 layout, FP8


TIKTOKEN_CONFIG = {
    "added_tokens_decoder": {str(256 + i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                            "normalized": False, "single_word": False}
                             for i, t in enumerate(["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>"])},
    "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
    "bos_token": "[BOS]", "eos_token": "[EOS]", "tokenizer_class": "TikTokenTokenizer", "model_max_length": 128,
}


def kimi_checkpoint(directory, hf):
    """Kimi K2's layout: model_type kimi_k2, FP8 linear weights with scales (put in another shard
    than their weights), a tiktoken tokenizer with its remote code and a generation config.
    Returns (original tensors, dequantised reference tensors, scales)."""
    import base64

    original, config = saved(hf, directory.parent / "plain")
    config |= {"model_type": "kimi_k2", "torch_dtype": "bfloat16", "quantization_config": FP8_CONFIG,
               "auto_map": {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}}
    tensors, reference, scales = {}, {}, {}
    for k, w in original.items():
        if LINEAR.match(k):
            q, s = quantize(w)
            tensors[k], tensors[k + "_scale_inv"], scales[k] = q, s, s
            reference[k] = dequantize_by_blocks(q, s)
        else:
            tensors[k] = reference[k] = w
    weights = sorted(k for k in tensors if not k.endswith("_scale_inv"))
    half = len(weights) // 2
    write_checkpoint(directory, tensors, config, [weights[:half], weights[half:], sorted(set(tensors) - set(weights))])
    (directory / "tiktoken.model").write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    (directory / "tokenizer_config.json").write_text(json.dumps(TIKTOKEN_CONFIG, indent=2))
    (directory / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_{{ m['role'] }}|>{{ m['content'] }}<|im_end|>{% endfor %}")
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 258, "max_length": 128}))
    (directory / "tokenization_kimi.py").write_text("raise RuntimeError('remote code must never run')\n")
    (directory / "modeling_deepseek.py").write_text("raise RuntimeError('remote code must never run')\n")
    return original, reference, scales


def test_kimi_k2_fp8_checkpoint_dequantises_and_matches_transformers(k2, tmp_path, monkeypatch):
    hf = hf_model(KIMI, seed=3)
    src = tmp_path / "kimi"
    original, reference, scales = kimi_checkpoint(src, hf)
    monkeypatch.delenv("K2_QUIET")
    result = k2("import-hf", src, "--dtype", "fp32", "--out", tmp_path / "fp32")
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "FP8 128x128 blocks dequantised" in said and "not copied: modeling_deepseek.py, tokenization_kimi.py" in said

    cfg = read_config(tmp_path / "fp32")
    imported = to_hf_state_dict(load_file(str(tmp_path / "fp32" / "model.safetensors")), cfg)
    assert imported.keys() == reference.keys() and len(scales) > 20
    for k, w in imported.items():
        assert torch.equal(w, reference[k]), k  # exactly the block-by-block dequantisation
        if k in scales:  # and within FP8's rounding of the original weights
            s = scales[k].repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
            assert ((w - original[k]).abs() <= original[k].abs() * 2**-4 + s * 2**-10).all(), k

    # transformers on the dequantised weights computes the same logits as k2 on the import
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    (tmp_path / "dequantised").mkdir()
    save_file(reference, str(tmp_path / "dequantised" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "dequantised" / "config.json").write_text(json.dumps(plain))
    model, _ = load_model(tmp_path / "fp32")
    x = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(48))
    assert hf_logit_gap(model, load_hf_float64(tmp_path / "dequantised"), x) < 1e-9

    # default dtype: the checkpoint's own (bfloat16); norms and router bias stay float32
    k2("import-hf", src, "--out", tmp_path / "auto")
    auto = load_file(str(tmp_path / "auto" / "model.safetensors"))
    ours = from_hf_state_dict(reference, cfg)[0]
    for k, w in auto.items():
        assert w.dtype == (torch.bfloat16 if w.dim() >= 2 else torch.float32), k
        assert torch.equal(w, ours[k].to(w.dtype)), k

    # the tokenizer data arrives verbatim; remote code does not
    for name in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "auto" / name).read_bytes() == (src / name).read_bytes(), name
    assert not list((tmp_path / "auto").glob("*.py"))

    # exported again, the checkpoint's own generation config (its <|im_end|> = 258) still stops generation
    k2("export", tmp_path / "auto", "--out", tmp_path / "export")
    generation = json.loads((tmp_path / "export" / "generation_config.json").read_text())
    assert 258 in generation["eos_token_id"] and generation["max_length"] == 128
    assert (tmp_path / "export" / "tiktoken.model").read_bytes() == (src / "tiktoken.model").read_bytes()

    # and its tokenizer as tokenizer.json: transformers loads it without Kimi's remote code, with k2's ids
    from k2cli.data.chat import render
    from k2cli.data.tokenizer import load_tokenizer

    ours = load_tokenizer(tmp_path / "auto")
    assert ours.kind == "tiktoken"
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))  # no trust_remote_code
    assert exported.eos_token_id == ours.token_id("[EOS]") and exported.convert_tokens_to_ids("<|im_end|>") == 258
    for text in ("Hello World, it's 12345.", "café naïve Ωmega", "中文字符和日本語", "[BOS]hi<|im_end|><|im_user|>x", " \n\t "):
        assert exported.encode(text, add_special_tokens=False) == ours.encode(text), text
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the cat"}]
    assert exported.apply_chat_template(chat, tokenize=True, return_dict=False) == render(ours, chat).ids
    assert exported.apply_chat_template(chat, tokenize=False) == "<|im_user|>hello<|im_end|><|im_assistant|>the cat<|im_end|>"


# ----------------------------------------------------------------------------- memory

MEASURE = r"""
import json, sys
from pathlib import Path

import torch  # everything imported before the measurement starts
from k2cli.model.hf import from_hf_state_dict, expected_shapes
from k2cli.model.hf_checkpoint import open_hf_checkpoint, read_hf_weights
from k2cli.model.transformer import K2Model


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024


mode, src, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
if mode == "import":
    from k2cli.cli import cli
expected_shapes(open_hf_checkpoint(src).config)  # warm the meta-model path
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size
base = status("VmRSS:")
if mode == "import":
    cli.main(["import-hf", str(src), "--out", out], standalone_mode=False)
else:  # the control: the whole checkpoint in memory, then converted
    from_hf_state_dict(read_hf_weights(src), open_hf_checkpoint(src).config)
print(json.dumps({"base": base, "peak": status("VmHWM:")}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to measure peak RSS")
def test_import_memory_is_bounded_by_one_shard_plus_the_output(tmp_path):
    """Peak resident memory of `k2 import-hf` on an 8-shard, ~55 MB fp32 checkpoint stays under
    output + largest shard + slack; reading every shard first (the old way) goes over it."""
    cfg = ModelConfig(name="mem", vocab_size=512, hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
                      q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                      intermediate_size=512, moe_intermediate_size=256, n_routed_experts=32, num_experts_per_tok=2,
                      first_k_dense_replace=1, max_position_embeddings=128)
    tensors = to_hf_state_dict(state_dict_for_saving(build_model(cfg, seed=0)), cfg)
    keys, shards, size = sorted(tensors), [[]], 0
    total = sum(t.numel() * 4 for t in tensors.values())
    for k in keys:  # 8 shards of about equal bytes
        if size > total / 8:
            shards, size = shards + [[]], 0
        shards[-1].append(k)
        size += tensors[k].numel() * 4
    write_checkpoint(tmp_path / "ckpt", tensors, to_hf_config(cfg), shards)
    largest = max(f.stat().st_size for f in (tmp_path / "ckpt").glob("*.safetensors"))
    del tensors

    def peak(mode):
        env = os.environ | {"K2_QUIET": "1", "OMP_NUM_THREADS": "1"}
        run = subprocess.run([sys.executable, "-c", MEASURE, mode, str(tmp_path / "ckpt"), str(tmp_path / mode)],
                             capture_output=True, text=True, env=env, check=True)
        m = json.loads(run.stdout.strip().splitlines()[-1])
        return m["peak"] - m["base"]

    bound = total + largest + 16 * 2**20  # slack for the allocator and the reader's one-tensor copies
    got, whole = peak("import"), peak("whole")
    print(f"output {total / 2**20:.1f} MiB, largest shard {largest / 2**20:.1f} MiB, "
          f"peak: import {got / 2**20:.1f} MiB, whole-checkpoint read {whole / 2**20:.1f} MiB")
    assert got < bound, (got, bound)
    assert whole > bound  # the control: the measurement does see a whole-checkpoint read


# ----------------------------------------------------------------------------- bad input


def small_checkpoint(directory, shards=1):
    cfg = ModelConfig.from_preset("micro")
    tensors = to_hf_state_dict(state_dict_for_saving(build_model(cfg, seed=0)), cfg)
    keys = sorted(tensors)
    write_checkpoint(directory, tensors, to_hf_config(cfg), [keys[i::shards] for i in range(shards)])
    return tensors


def test_clear_errors_for_checkpoints_k2_cannot_import(k2, tmp_path, artifacts_root):
    def fails(directory, *words):
        assert_clean_error(k2("import-hf", directory, ok=False), *words)

    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "no config.json")

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    fails(llama, "llama", "LlamaForCausalLM", "deepseek_v3", "kimi_k2")

    shards = tmp_path / "shards"
    small_checkpoint(shards, shards=3)
    (shards / "model-00002-of-00003.safetensors").unlink()
    fails(shards, "model-00002-of-00003.safetensors", "missing", "1 of the 3 shards")

    tensors = small_checkpoint(tmp_path / "shape")
    key = "model.layers.0.self_attn.q_a_proj.weight"
    write_checkpoint(tmp_path / "shape", tensors | {key: torch.zeros(7, 32)}, json.loads((tmp_path / "shape" / "config.json").read_text()),
                     [sorted(tensors)])
    fails(tmp_path / "shape", key, "[7, 32]", "[16, 32]")

    fp8 = tmp_path / "fp8"
    q, _ = quantize(tensors[key])
    config = to_hf_config(ModelConfig.from_preset("micro")) | {"quantization_config": FP8_CONFIG}
    write_checkpoint(fp8, tensors | {key: q}, config, [sorted(tensors)])
    fails(fp8, key, "float8_e4m3fn", "weight_scale_inv")

    (fp8 / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "compressed-tensors"}}))
    fails(fp8, "compressed-tensors", "not supported", "fp8")

    assert not (artifacts_root / "import").exists()  # nothing half-written
