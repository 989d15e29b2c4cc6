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


def test_parity_with_apply_chat_template(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path, chat_template=CHAT_TEMPLATE)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for conv, tools, gen in ((CONV, TOOLS, False), (CONV[:2], None, True), (CONV[:4], TOOLS, True)):
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
    text = render_text([CONV[2]])[len("<|im_assistant|>assistant<|im_middle|>"):]
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
