"""The chat format: token-level parity with transformers' apply_chat_template, masks, the parser."""

import json

import pytest

from k2cli.data.chat import CHAT_TEMPLATE, call_id, parse_assistant, render, render_text, validate_conversation
from k2cli.data.tokenizer import train_tokenizer
from k2cli.errors import K2Error

TOOLS = [{"type": "function", "function": {"name": "get_balance", "description": "Balance of an account",
          "parameters": {"type": "object", "properties": {"account_id": {"type": "string"}}, "required": ["account_id"]}}}]
CONV = [
    {"role": "system", "content": "You are a bank assistant. Café ✓"},
    {"role": "user", "content": "What is the balance of account A-17?"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"id": call_id("get_balance", 0), "type": "function", "function": {"name": "get_balance", "arguments": {"account_id": "A-17"}}}]},
    {"role": "tool", "tool_call_id": call_id("get_balance", 0), "name": "get_balance", "content": json.dumps({"balance": 1520})},
    {"role": "assistant", "content": "The balance of A-17 is 1520."},
]


@pytest.fixture(scope="module")
def tok():
    corpus = [json.dumps(TOOLS), render_text(CONV, TOOLS)] * 20 + ["The balance of account is high. Let me check."] * 20
    return train_tokenizer(corpus, vocab_size=600)


def test_render_text_matches_ids(tok):
    r = render(tok, CONV, TOOLS)
    assert tok.decode(r.ids) == render_text(CONV, TOOLS)


# Multi-turn, list-of-parts content, a tool result without `name` (header "tool"), two calls in one turn,
# string arguments kept verbatim, a user with a name, no system message (K2's default one is inserted).
CONV2 = [
    {"role": "user", "content": [{"type": "text", "text": "Balances of "}, {"type": "text", "text": "A-17 and B-2?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id("get_balance", 0), "type": "function", "function": {"name": "get_balance", "arguments": '{"account_id":"A-17"}'}},
        {"id": call_id("get_balance", 1), "type": "function", "function": {"name": "get_balance", "arguments": {"account_id": "B-2"}}}]},
    {"role": "tool", "tool_call_id": call_id("get_balance", 0), "content": [{"type": "text", "text": "1520"}]},
    {"role": "tool", "tool_call_id": call_id("get_balance", 1), "name": "get_balance", "content": "7"},
    {"role": "assistant", "content": [{"type": "text", "text": "1520 and 7."}]},
    {"role": "user", "name": "ana", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]


def test_k2_template_layout():
    """Kimi K2's published layout, byte for byte: tool_declare with compact JSON, K2's default system
    prompt, tool results under <|im_system|> headed by the function name (else `tool`)."""
    text = render_text(CONV2, TOOLS, add_generation_prompt=True)
    assert text.startswith('<|im_system|>tool_declare<|im_middle|>[{"type":"function","function":{"name":"get_balance",')
    assert ('<|im_end|><|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>'
            '<|im_user|>user<|im_middle|>Balances of A-17 and B-2?<|im_end|>') in text
    assert ('<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>functions.get_balance:0'
            '<|tool_call_argument_begin|>{"account_id":"A-17"}<|tool_call_end|><|tool_call_begin|>functions.get_balance:1'
            '<|tool_call_argument_begin|>{"account_id": "B-2"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>') in text
    assert '<|im_system|>tool<|im_middle|>## Return of functions.get_balance:0\n1520<|im_end|>' in text
    assert '<|im_system|>get_balance<|im_middle|>## Return of functions.get_balance:1\n7<|im_end|>' in text
    assert '<|im_user|>ana<|im_middle|>Thanks!<|im_end|>' in text and text.endswith("<|im_assistant|>assistant<|im_middle|>")
    assert "<|im_tool|>" not in text and render_text(CONV).count("You are Kimi") == 0  # a system message replaces the default


def test_parity_with_apply_chat_template(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path, chat_template=CHAT_TEMPLATE)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for conv, tools, gen in ((CONV, TOOLS, False), (CONV[:2], None, True), (CONV[:4], TOOLS, True),
                             (CONV2, TOOLS, False), (CONV2[:4], None, True), (CONV2, None, True), (CONV2[:1], TOOLS, False),
                             ([{"role": "developer", "content": "Be brief."}] + CONV2[:2], TOOLS, False)):
        ours = render(tok, conv, tools, add_generation_prompt=gen).ids
        theirs = hf.apply_chat_template(conv, tools=tools, add_generation_prompt=gen, tokenize=True, return_dict=False)
        if isinstance(theirs, dict):
            theirs = theirs["input_ids"]
        assert ours == list(theirs)


def test_mask_covers_assistant_tokens_only(tok):
    r = render(tok, CONV, TOOLS)
    trained = tok.decode([i for i, m in zip(r.ids, r.mask) if m])
    assert "Let me check." in trained and "The balance of A-17 is 1520." in trained and '"account_id": "A-17"' in trained
    assert trained.count("<|im_end|>") == 2  # each assistant turn learns to stop
    for prompt_text in ("bank assistant", "What is the balance", "1520}", "tool_declare", "assistant<|im_middle|>"):
        assert prompt_text not in trained


def test_parser_round_trip_and_never_crashes():
    text = render_text([CONV[2]]).split("<|im_assistant|>assistant<|im_middle|>", 1)[1]
    turn = parse_assistant(text)
    assert turn.content == "Let me check." and not turn.errors and turn.finished
    assert turn.tool_calls[0]["function"] == {"name": "get_balance", "arguments": {"account_id": "A-17"}}
    for junk in ["<|tool_calls_section_begin|><|tool_call_begin|>functions.x:0<|tool_call_argument_begin|>{bad<|tool_call_end|>",
                 "<|tool_calls_section_begin|><|tool_call_begin|>nonsense<|tool_call_argument_begin|>{}<|tool_call_end|>",
                 "<|tool_calls_section_begin|>", "<|tool_call_end|><|im_end|>", "", "<|tool_calls_section_begin|><|tool_call_begin|>functions.x:0<|tool_call_argument_begin|>[1]<|tool_call_end|><|tool_calls_section_end|>"]:
        turn = parse_assistant(junk)
        if "tool_calls_section_begin" in junk:
            assert turn.errors and turn.error_messages()[0]["role"] == "tool"
    assert parse_assistant("half a sentence").finished is False


def test_conversation_validation():
    validate_conversation(CONV)
    with pytest.raises(K2Error, match="no earlier assistant"):
        validate_conversation([CONV[1], CONV[3]])
    with pytest.raises(K2Error, match="system message after"):
        validate_conversation([CONV[1], CONV[0]])
    with pytest.raises(K2Error, match="unanswered"):
        validate_conversation(CONV[:3] + [CONV[1]])
    with pytest.raises(K2Error, match="unknown role"):
        validate_conversation([{"role": "robot", "content": "x"}])
