"""Tokenizers a model brings: a Hugging Face tokenizer with its own specials and chat template, and
Kimi's tiktoken format; rendering, masks, stop ids and tool-call parsing follow each one's template."""

import json

import pytest

from k2cli.data.chat import CHAT_TEMPLATE, call_id, parse_turn, render, template_text
from k2cli.data.tokenizer import load_tokenizer, resolve_tokenizer, train_tokenizer, write_tiktoken_model
from k2cli.errors import K2Error

SPECIALS = ["<s>", "</s>", "<|start|>", "<|end|>"]
# A user's own template: Hermes-style <tool_call> JSON blocks, bos written by the template.
BODY = ("{% if m['content'] is string %}{{ m['content'] }}{% elif m['content'] %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}"
        "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}</tool_call>{% endfor %}"
        "<|end|>")
HEAD = "{{ bos_token }}{% if tools %}<|start|>system\nTools: {{ tools | tojson }}<|end|>\n{% endif %}{% for m in messages %}<|start|>{{ m['role'] }}\n"
TAIL = "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
TEMPLATE = HEAD + BODY + TAIL
# The same with the assistant's text marked, as TRL-ready templates do.
MARKED = HEAD + "{% if m['role'] == 'assistant' %}{% generation %}" + BODY + "{% endgeneration %}{% else %}" + BODY + "{% endif %}" + TAIL
TOOLS = [{"type": "function", "function": {"name": "get_balance", "parameters": {"type": "object", "properties": {"account_id": {"type": "string"}}}}}]
CONV = [
    {"role": "system", "content": "You are a bank assistant."},
    {"role": "user", "content": "Balance of A-17?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": call_id("get_balance", 0), "type": "function", "function": {"name": "get_balance", "arguments": {"account_id": "A-17"}}}]},
    {"role": "tool", "tool_call_id": call_id("get_balance", 0), "content": "1520"},
    {"role": "assistant", "content": "It is 1520."},
    {"role": "user", "content": [{"type": "text", "text": "And B-2?"}]},
    {"role": "assistant", "content": "I cannot tell."},
]


def hf_dir(tmp_path, template=TEMPLATE, name="hf"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [json.dumps(TOOLS), "You are a bank assistant. Balance of A-17? Checking. It is 1520. I cannot tell."] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path / name
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
        "chat_template": template}))
    return d


def test_hf_tokenizer_with_its_own_specials_and_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = hf_dir(tmp_path)
    tok = load_tokenizer(d)
    assert tok.kind == "hf" and tok.eot_id == tok.token_id("</s>")
    assert tok.end_of_turn == ("<|end|>", "</s>") and tok.stop_ids == (tok.token_id("<|end|>"), tok.token_id("</s>"))
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    for conv, tools, gen in ((CONV, TOOLS, False), (CONV[:4], TOOLS, True), (CONV, None, True)):
        theirs = hf.apply_chat_template(conv, tools=tools, add_generation_prompt=gen, tokenize=True, return_dict=False)
        assert render(tok, conv, tools, gen).ids == list(theirs)
    # the assistant mask, by prefix diff: the assistant's text, calls and end-of-turn, nothing else
    r = render(tok, CONV, TOOLS)
    trained = tok.decode([i for i, m in zip(r.ids, r.mask) if m])
    assert "Checking." in trained and '"account_id": "A-17"' in trained and "It is 1520." in trained and "I cannot tell." in trained
    assert trained.count("<|end|>") == 3
    for prompt_text in ("bank assistant", "Balance of", "1520<|end|>", "And B-2", "Tools:", "<|start|>"):
        assert prompt_text not in trained


def test_generation_markers_give_the_same_mask_as_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    marked, plain = load_tokenizer(hf_dir(tmp_path, MARKED, "marked")), load_tokenizer(hf_dir(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "marked"))
    out = hf.apply_chat_template(CONV, tools=TOOLS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    r = render(marked, CONV, TOOLS)
    assert r.ids == out["input_ids"] and [int(m) for m in r.mask] == out["assistant_masks"]
    # prefix diff on the unmarked template trains the same tokens, plus the newline after each <|end|>
    p = render(plain, CONV, TOOLS)
    assert p.ids == r.ids and all(pm or not rm for pm, rm in zip(p.mask, r.mask)) and sum(p.mask) - sum(r.mask) <= 3


def test_tool_calls_parsed_in_the_template_format(tmp_path):
    pytest.importorskip("transformers")
    tok = load_tokenizer(hf_dir(tmp_path))
    turn = parse_turn(tok, 'Checking.<tool_call>{"name": "get_balance", "arguments": {"account_id": "A-17"}}</tool_call><|end|>\n')
    assert turn.finished and turn.content == "Checking." and not turn.errors
    assert turn.tool_calls[0]["function"] == {"name": "get_balance", "arguments": {"account_id": "A-17"}}
    bad = parse_turn(tok, '<tool_call>{"name": "get_balance", "arguments": {oops</tool_call>')
    assert not bad.finished and bad.errors and not bad.tool_calls
    plain = parse_turn(tok, '{"name": "get_balance", "parameters": {"account_id": "B-2"}}</s>')
    assert plain.tool_calls[0]["function"]["arguments"] == {"account_id": "B-2"}
    assert parse_turn(tok, "It is 1520.<|end|>").content == "It is 1520."


def test_resolving_a_tokenizer_ref(tmp_path, k2):
    pytest.importorskip("transformers")
    d = hf_dir(tmp_path)
    by_dir, art = resolve_tokenizer(str(d))
    by_file, _ = resolve_tokenizer(str(d / "tokenizer.json"))
    assert art is None and by_dir.fingerprint() == by_file.fingerprint() and by_file.kind == "hf"
    assert by_file.stop_ids == by_dir.stop_ids  # tokenizer.json next to its config picks the config up
    k2tok = train_tokenizer(["Person 1 was born in Oslo."] * 50, vocab_size=300)
    (tmp_path / "k2tok").mkdir()
    k2tok.save(tmp_path / "k2tok")
    again = load_tokenizer(tmp_path / "k2tok")
    assert again.kind == "k2" and again.stop_ids == (again.token_id("<|im_end|>"), again.token_id("<|endoftext|>"))
    with pytest.raises(K2Error, match="neither a file"):
        resolve_tokenizer("no-such-tokenizer:latest")
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(K2Error, match="slow/SentencePiece"):
        load_tokenizer(tmp_path / "slow")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(K2Error) as e:
        load_tokenizer(tmp_path / "broken")
    assert "train a k2 tokenizer" not in str(e.value) and "damaged" not in str(e.value)


def test_foreign_tokenizer_names_what_it_lacks(tmp_path):
    tok = load_tokenizer(hf_dir(tmp_path))
    with pytest.raises(K2Error, match="has no special token '<|im_end|>'") as e:
        tok.token_id("<|im_end|>")
    assert "train a k2 tokenizer" not in str(e.value)
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(K2Error, match="has no chat template"):
        render(load_tokenizer(tmp_path / "hf"), CONV[:2])


def kimi_dir(tmp_path):
    """A tiny Kimi-layout tokenizer: tiktoken.model ranks + tokenizer_config.json naming the specials."""
    pytest.importorskip("tiktoken")
    ranks = {bytes([i]): i for i in range(256)}
    for merge in (b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"fu", b"nc", b"func"):
        ranks[merge] = len(ranks)
    d = tmp_path / "kimi"
    d.mkdir()
    write_tiktoken_model(ranks, d / "tiktoken.model")
    names = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|reserved_token_5|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|reserved_token_8|>", "[EOT]", "<|im_system|>", "<|tool_calls_section_begin|>",
             "<|tool_calls_section_end|>", "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<|im_middle|>"]
    n = len(ranks)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[EOS]", "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {str(n + i): {"content": t, "special": True} for i, t in enumerate(names)},
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}))
    return d


def test_kimi_tiktoken_tokenizer(tmp_path):
    d = kimi_dir(tmp_path)
    tok = load_tokenizer(d)
    n = 256 + 12
    assert tok.kind == "tiktoken" and tok.vocab_size == n + 258
    assert tok.token_id("[EOS]") == n + 1 == tok.eot_id and tok.token_id("<|im_middle|>") == n + 16
    assert tok.has_token(f"<|reserved_token_{n + 100}|>")  # unnamed ids are reserved, as in tokenization_kimi.py
    assert tok.stop_ids == (tok.token_id("<|im_end|>"), tok.eot_id)
    text = "hello world<|im_end|>func ✓"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.token_id("<|im_end|>") in ids and tok.decode(ids[:1]) == "hello"  # merged by the ranks
    assert tok.decode(ids, skip_special=True) == "hello worldfunc ✓"
    # K2's template renders natively on it, the same ids as its Jinja text tokenised whole
    conv = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world", "tool_calls": [
        {"id": call_id("func", 0), "type": "function", "function": {"name": "func", "arguments": {"hello": "world"}}}]}]
    r = render(tok, conv, [{"type": "function", "function": {"name": "func"}}])
    tools = [{"type": "function", "function": {"name": "func"}}]
    assert tok.decode(r.ids) == template_text(tok, conv, tools)
    try:  # Jinja (transformers' renderer) on the same template, tokenised whole: the same ids
        from k2cli.data.chat import _jinja

        assert r.ids == tok.encode(_jinja(tok, conv, tools, False)[0])
    except K2Error:  # transformers not installed
        pass
    trained = tok.decode([i for i, m in zip(r.ids, r.mask) if m])
    assert trained.startswith("world<|tool_calls_section_begin|>") and trained.endswith("<|im_end|>")
    prompt = len(render(tok, conv[:1], tools, add_generation_prompt=True).ids)
    turn = parse_turn(tok, tok.decode(r.ids[prompt:]))
    assert turn.content == "world" and turn.tool_calls[0]["function"] == {"name": "func", "arguments": {"hello": "world"}}
    (tmp_path / "copy").mkdir()
    tok.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").fingerprint() == tok.fingerprint()


# Texts a converted tokenizer must split exactly as tiktoken does: ASCII, contractions, accents, CJK,
# digit runs (cut in threes), whitespace runs, and special tokens written in the text.
SAMPLES = ["Hello World, it's the café in Zürich: 12345 apples.", "中文字符和日本語のテキスト, 한국어", "DON'T stop\n\n  x!!!\r\n",
           "naïve Ωmega ÀÉÎ 0.5e10 １２３", "def f(x):\n    return x**2  # comment", "[BOS]hi<|im_end|>  there<|im_user|>",
           "   ", "", "é" * 7, "emoji 🙂🙂 tabs\t\tend"]


def trained_kimi_dir(tmp_path):
    """A tiktoken.model with real merges (a byte-level BPE trained on SAMPLES, its vocabulary as ranks) and
    K2's template: Kimi K2's tokenizer in miniature."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from k2cli.data.tokenizer import _byte_alphabet

    pytest.importorskip("tiktoken")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(SAMPLES * 20, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                              show_progress=False))
    byte = {c: b for b, c in enumerate(_byte_alphabet())}
    ranks = {}
    for token, _ in sorted(bpe.get_vocab().items(), key=lambda x: x[1]):
        ranks.setdefault(bytes(byte[c] for c in token), len(ranks))
    assert len(ranks) > 256 + 100  # many merges
    d = tmp_path / "trained"
    d.mkdir()
    write_tiktoken_model(ranks, d / "tiktoken.model")
    names = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
             "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>", "<|tool_call_argument_begin|>",
             "<|tool_call_end|>"]
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "[BOS]", "eos_token": "[EOS]", "tokenizer_class": "TikTokenTokenizer",
        "added_tokens_decoder": {str(len(ranks) + i): {"content": t, "special": True} for i, t in enumerate(names)},
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}))
    (d / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return d


def test_tiktoken_tokenizer_saved_for_transformers(tmp_path):
    """save_hf writes tokenizer.json + tokenizer_config.json: transformers loads them without remote code,
    and they give tiktoken's ids for every text and K2's rendering for every conversation."""
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(trained_kimi_dir(tmp_path))
    out = tmp_path / "hf"
    out.mkdir()
    tok.save_hf(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in config
    hf = transformers.AutoTokenizer.from_pretrained(str(out))  # no trust_remote_code: nothing to run
    assert hf.eos_token_id == tok.eot_id and hf.convert_tokens_to_ids("<|im_end|>") == tok.token_id("<|im_end|>")
    assert len(hf) == tok.vocab_size
    for text in SAMPLES:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
        assert hf.decode(tok.encode(text)) == text
    conv = CONV  # tools, tool calls, tool results
    assert hf.apply_chat_template(conv, tools=TOOLS, tokenize=False) == template_text(tok, conv, TOOLS)
    assert hf.apply_chat_template(conv, tools=TOOLS, tokenize=True, return_dict=False) == render(tok, conv, TOOLS).ids
    again = load_tokenizer(out)  # and k2 reads the converted files as the same tokenizer
    assert all(again.encode(t) == tok.encode(t) for t in SAMPLES) and again.stop_ids == tok.stop_ids


def test_tiktoken_file_errors(tmp_path):
    pytest.importorskip("tiktoken")
    d = tmp_path / "bad"
    d.mkdir()
    (d / "tiktoken.model").write_text("not base64 at all\n")
    with pytest.raises(K2Error, match="cannot read"):
        load_tokenizer(d)


def test_serving_turns_follow_the_template(tmp_path):
    """k2 serve's prompt and turn parsing with an imported tokenizer: its template, its end-of-turn token,
    JSON tool calls; a client's own call ids (call_abc) and tool results without a name are accepted."""
    pytest.importorskip("transformers")
    from k2cli.serve.turns import TurnDecoder, build_prompt

    tok = load_tokenizer(hf_dir(tmp_path))
    history = [{"role": "developer", "content": "You are a bank assistant."}, {"role": "user", "content": "Balance of A-17?"},
               {"role": "assistant", "content": "Checking.", "tool_calls": [
                   {"id": "call_abc", "type": "function", "function": {"name": "get_balance", "arguments": '{"account_id": "A-17"}'}}]},
               {"role": "tool", "tool_call_id": "call_abc", "content": "1520"}]
    prompt = build_prompt(tok, history, TOOLS)
    assert prompt.stop_ids == tok.stop_ids and prompt.allow_tools
    assert tok.decode(prompt.ids).endswith("<|start|>tool\n1520<|end|>\n<|start|>assistant\n")
    with pytest.raises(K2Error, match="K2's tool-call tokens"):
        build_prompt(tok, history, TOOLS, tool_choice="required")
    dec = TurnDecoder(tok, allow_tools=True)
    for i in tok.encode('Again.<tool_call>{"name": "get_balance", "arguments": {"account_id": "B-2"}}</tool_call>'):
        dec.feed(i)
    dec.feed(tok.token_id("<|end|>"))
    turn = dec.finish("stop")
    assert turn.finish_reason == "tool_calls" and turn.content == "Again."
    assert json.loads(turn.tool_calls[0]["function"]["arguments"]) == {"account_id": "B-2"}
    dec = TurnDecoder(tok)
    for i in tok.encode("It is 1520."):
        dec.feed(i)
    dec.feed(tok.token_id("<|end|>"))
    assert dec.finish("stop").content == "It is 1520."
