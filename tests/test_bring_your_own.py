"""Bring your own model, tokenizer and chat data, the whole way through k2:

    a user's checkpoint (transformers' DeepseekV3 with its own tokenizer, special-token names and chat
    template; or Kimi K2's layout: FP8 weights, a tiktoken tokenizer)
      -> k2 import-hf -> k2 sft MODEL --data chat.jsonl (OpenAI format: tools, call_ ids, list content,
         a developer message) -> k2 serve answers the official openai client, tools declared
      -> k2 export --format hf -> transformers loads it; apply_chat_template unchanged; generation stops
         at the template's end of turn.
And pretraining with your own tokenizer file (tokenizer.ref=PATH/tokenizer.json).
"""

import json

import pytest
import torch

from test_import_hf import KIMI, SMALL, hf_model, kimi_checkpoint

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

# A user's template in the common style (Qwen-like): its own turn markers, tools as JSON in the system
# turn, tool calls as <tool_call>{...}</tool_call>, tool results in their own role, content as text.
USER_TEMPLATE = (
    "{% if tools %}<|start|>system\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|end|>\n{% endif %}"
    "{% for m in messages %}<|start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% elif m['content'] %}"
    "{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}<tool_call>{\"name\": \"{{ c['function']['name'] }}\", "
    "\"arguments\": {{ c['function']['arguments'] | tojson if c['function']['arguments'] is not string "
    "else c['function']['arguments'] }}}</tool_call>{% endfor %}{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}


def chat_rows(n: int = 24) -> list[dict]:
    """OpenAI/TRL rows: tools with call_ ids and tool results, list-of-parts content, a developer message."""
    rows = []
    for i in range(n):
        city = ["Paris", "Oslo", "Lima", "Kyoto"][i % 4]
        rows.append({"messages": [
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": f"Weather in {city}?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"call_{i:04x}abc", "type": "function",
                 "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
            {"role": "tool", "tool_call_id": f"call_{i:04x}abc", "content": f"{10 + i} C"},
            {"role": "assistant", "content": f"It is {10 + i} C in {city}."},
        ], "tools": [TOOL]})
        rows.append({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the cat sat"}]})
    return rows


def users_tokenizer(directory):
    """The user's own BPE: specials <s> </s> <|start|> <|end|>, and the template above."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = [json.dumps(r) for r in chat_rows(8)] + ["hello world", "the cat sat on the mat"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<|start|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                  additional_special_tokens=["<|start|>", "<|end|>"])
    hf_tok.chat_template = USER_TEMPLATE
    hf_tok.save_pretrained(directory)
    return hf_tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_serve_export(k2, tmp_path, imported):
    """The flow after import: SFT on chat JSONL, serve with tools, export. Returns the export directory."""
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    result = k2("sft", imported, "--data", data, "--out", tmp_path / "sft", "--set", "train.steps=2",
                "--set", "train.batch_size=2", "--set", "train.seq_len=256", "--set", "train.eval_every=0")
    manifest = json.loads((tmp_path / "sft" / "manifest.json").read_text())
    assert manifest["metrics"]["chat_rows"] == 48 and manifest["metrics"]["chat_skipped"] == 0, result.output

    from k2cli.serve.server import BackgroundServer
    from k2cli.stages.serve import build_app

    app, engine = build_app(str(tmp_path / "sft"), default_max_tokens=8)[:2]
    try:
        with BackgroundServer(app) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)
            reply = client.chat.completions.create(model=client.models.list().data[0].id, tools=[TOOL], max_tokens=8,
                                                   messages=[{"role": "developer", "content": "Be brief."},
                                                             {"role": "user", "content": "Weather in Paris?"}])
            assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    finally:
        engine.stop()

    k2("export", tmp_path / "sft", "--format", "hf", "--out", tmp_path / "export")
    return tmp_path / "export"


def test_users_deepseek_v3_with_its_own_tokenizer_and_template(k2, tmp_path):
    src = tmp_path / "user-model"
    hf_model(dict(SMALL, max_position_embeddings=512)).save_pretrained(src)
    hf_tok = users_tokenizer(src)
    k2("import-hf", src, "--out", tmp_path / "imported")
    export = sft_serve_export(k2, tmp_path, tmp_path / "imported")

    # transformers loads both; the template renders as the user's own did; generation stops at <|end|>
    model = transformers.AutoModelForCausalLM.from_pretrained(str(export))
    tok = transformers.AutoTokenizer.from_pretrained(str(export))
    convo = chat_rows(1)[0]
    assert tok.apply_chat_template(convo["messages"], tools=convo["tools"], tokenize=False) == \
        hf_tok.apply_chat_template(convo["messages"], tools=convo["tools"], tokenize=False)
    end = hf_tok.convert_tokens_to_ids("<|end|>")
    gen = json.loads((export / "generation_config.json").read_text())
    assert end in gen["eos_token_id"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    biased = _bias_towards(model, end)  # the end of turn wins every position: generate must stop right after it
    out = biased.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out[0, -1].item() == end and out.shape[1] == prompt["input_ids"].shape[1] + 1


def _bias_towards(model, token: int):
    """The same model whose lm_head makes `token` win at every position (a constant added to its logit)."""
    with torch.no_grad():
        head = model.lm_head
        bias = torch.zeros(head.out_features)
        bias[token] = 1e4
        new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
        new.weight.copy_(head.weight)
        new.bias.copy_(bias)
        model.lm_head = new
    return model


def test_kimi_k2_layout_fp8_with_a_tiktoken_tokenizer(k2, tmp_path):
    pytest.importorskip("tiktoken")
    src = tmp_path / "kimi"
    kimi_checkpoint(src, hf_model(dict(KIMI, max_position_embeddings=512), seed=3))
    k2("import-hf", src, "--out", tmp_path / "imported")
    export = sft_serve_export(k2, tmp_path, tmp_path / "imported")
    gen = json.loads((export / "generation_config.json").read_text())
    eos = gen["eos_token_id"]
    assert 258 in (eos if isinstance(eos, list) else [eos])  # the checkpoint's <|im_end|>
    transformers.AutoModelForCausalLM.from_pretrained(str(export))
    # the tiktoken tokenizer is exported as tokenizer.json: transformers loads it without Kimi's remote code,
    # and the checkpoint's template renders to the same ids as k2's tokenizer of the import
    from k2cli.data.chat import render
    from k2cli.data.tokenizer import load_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(str(export))
    ours = load_tokenizer(tmp_path / "imported")
    assert ours.kind == "tiktoken" and tok.convert_tokens_to_ids("<|im_end|>") == 258
    convo = [{"role": "user", "content": "Weather in Zürich? 中文 123"}, {"role": "assistant", "content": "It is 12 C."}]
    assert tok.apply_chat_template(convo, tokenize=False) == \
        "<|im_user|>Weather in Zürich? 中文 123<|im_end|><|im_assistant|>It is 12 C.<|im_end|>"  # the checkpoint's template
    assert tok.apply_chat_template(convo, tokenize=True, return_dict=False) == render(ours, convo).ids


def test_pretrain_with_your_own_tokenizer_json(k2, tmp_path):
    users_tokenizer(tmp_path / "tok")
    k2("data", "synth", "--preset", "micro")
    k2("rephrase", "--preset", "micro")
    k2("pretrain", "--preset", "micro", "--set", f"tokenizer.ref={tmp_path / 'tok' / 'tokenizer.json'}",
       "--set", "train.steps=2", "--out", tmp_path / "pre")
    from k2cli.data.tokenizer import load_tokenizer

    mine, theirs = load_tokenizer(tmp_path / "pre"), load_tokenizer(tmp_path / "tok")
    assert mine.fingerprint() == theirs.fingerprint() and mine.vocab_size == 300
    config = json.loads((tmp_path / "pre" / "model.json").read_text())
    assert config["vocab_size"] == 300 and config["eos_token_id"] == theirs.token_id("</s>")
