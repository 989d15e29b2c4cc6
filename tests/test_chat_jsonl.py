"""SFT on your own chat data: OpenAI/TRL `messages` (+ `tools`) JSONL, good rows and bad ones."""

import json

import pytest

from k2cli.data.chat import CHAT_TEMPLATE, from_openai, parse_assistant, render_text
from k2cli.data.chat_jsonl import read_chat_jsonl
from k2cli.data.sft_data import SFTDataConfig, build_sft_data, load_chat
from k2cli.data.tokenizer import train_tokenizer
from k2cli.errors import K2Error

TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ROW = {"messages": [
    {"role": "developer", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Oslo?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_abc", "content": "{\"temp\": 4}"},
    {"role": "assistant", "content": [{"type": "text", "text": "It is 4 degrees."}]}], "tools": TOOLS}
PLAIN = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"}]}


@pytest.fixture(scope="module")
def tok():
    corpus = [render_text(from_openai(ROW["messages"])[0], TOOLS), render_text(PLAIN["messages"])] * 20
    return train_tokenizer(corpus, vocab_size=500)


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_openai_rows_normalised_to_the_template():
    messages, back = from_openai(ROW["messages"])
    assert messages[0] == {"role": "system", "content": "Answer briefly."}  # developer is the system role
    assert messages[1]["content"] == "Weather in Oslo?" and messages[4]["content"] == "It is 4 degrees."
    call = messages[2]["tool_calls"][0]
    assert call["id"] == "functions.weather:0" and call["function"]["arguments"] == '{"city": "Oslo"}'
    assert messages[3]["tool_call_id"] == "functions.weather:0" and messages[3]["name"] == "weather"
    assert back == {"functions.weather:0": "call_abc"}  # the model's ids map back to the client's
    text = render_text(messages, TOOLS)
    turn = parse_assistant(text.split("<|im_assistant|>assistant<|im_middle|>")[1])
    assert not turn.errors and back[turn.tool_calls[0]["id"]] == "call_abc"
    assert "<|im_system|>weather<|im_middle|>## Return of functions.weather:0\n{\"temp\": 4}<|im_end|>" in text


def test_reader_renders_rows_and_trains_the_assistant(tok, tmp_path):
    d = tmp_path / "chats"
    d.mkdir()
    write(d / "a.jsonl", [ROW, PLAIN])
    write(d / "b.jsonl", [PLAIN, "", PLAIN])
    convs, report = read_chat_jsonl(d, tok)
    assert report.rows == report.kept == 4 and not report.skipped and [c["source"].rsplit(":", 1)[1] for c in convs] == ["1", "2", "1", "3"]
    trained = tok.decode([i for i, m in zip(convs[0]["ids"], convs[0]["mask"]) if m])
    assert "functions.weather:0" in trained and '{"city": "Oslo"}' in trained and "It is 4 degrees." in trained
    assert "Answer briefly" not in trained and "Oslo?" not in trained and "temp" not in trained
    # the same (ids, mask) examples the SFT packer takes, mixed with another source
    cfg = SFTDataConfig(chat=[str(d)], mix={"qa": 1.0}, val_fraction=0.2)
    chat, _ = load_chat(cfg, tok)
    qa = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}] * 4
    data = build_sft_data(tok, {"chat": chat, "qa": qa}, cfg, seq_len=256, seed=0)
    assert data.counts["chat"]["used"] == 4 and data.counts["qa"]["used"] == 4  # chat: weight 1 unless mix.chat says otherwise
    assert data.counts["chat"]["trained_tokens"] == sum(sum(c["mask"]) for c in chat)
    assert len(report.fingerprint) == 16 and load_chat(cfg, tok)[1].fingerprint == report.fingerprint
    with pytest.raises(K2Error, match="chat source was not loaded"):
        build_sft_data(tok, {"qa": qa}, cfg, seq_len=256, seed=0)


BAD = [
    ("{not json", "malformed JSON"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{city: Oslo"}}]}]}, "not valid JSON"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c9", "content": "1"},
                   {"role": "assistant", "content": "y"}]}, "did not make"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"text": "not a chat"}, "no 'messages'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "y"}]}, "'image_url' is not supported"),
]


def test_bad_rows_are_skipped_and_named(tok, tmp_path):
    rows = [PLAIN] * 60 + [r for r, _ in BAD]
    f = write(tmp_path / "mixed.jsonl", rows)
    convs, report = read_chat_jsonl(f, tok, max_bad_fraction=0.2)
    assert report.rows == 67 and report.kept == 60 and len(convs) == 60
    assert [line for _, line, _ in report.skipped] == list(range(61, 68))
    for (_, _, why), (_, expected) in zip(report.skipped, BAD):
        assert expected in why, (why, expected)
    assert "mixed.jsonl:61 malformed JSON" in report.summary()
    with pytest.raises(K2Error) as e:  # above the fraction: one error naming the first bad rows
        read_chat_jsonl(f, tok, max_bad_fraction=0.05)
    assert "7 of 67 chat rows cannot be used" in str(e.value) and "mixed.jsonl line 61: malformed JSON" in str(e.value)
    assert "data.max_bad_fraction" in str(e.value)


def test_reader_errors(tok, tmp_path):
    with pytest.raises(K2Error, match="does not exist"):
        read_chat_jsonl(tmp_path / "nope.jsonl", tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(K2Error, match="no .jsonl files"):
        read_chat_jsonl(tmp_path / "empty", tok)
    notemplate = train_tokenizer(["Hi there"] * 30, vocab_size=300)
    notemplate.config["chat_template"] = None
    with pytest.raises(K2Error, match="has no chat template"):
        read_chat_jsonl(write(tmp_path / "a.jsonl", [PLAIN]), notemplate)
    assert notemplate.chat_template is None and tok.chat_template == CHAT_TEMPLATE


def test_served_history_renders_as_trained(tok):
    """A client's history with its own call ids renders exactly as the same row does in SFT."""
    from k2cli.serve.turns import build_prompt

    history = ROW["messages"][:4]
    prompt = build_prompt(tok, history, TOOLS)
    trained = read_rows_ids(tok, {"messages": ROW["messages"], "tools": TOOLS})
    assert trained[: len(prompt.ids) - 3] == prompt.ids[:-3]  # all but the generation prompt
    assert "<|im_system|>weather<|im_middle|>## Return of functions.weather:0\n" in tok.decode(prompt.ids)


def read_rows_ids(tok, row):
    from k2cli.data.chat import render
    from k2cli.data.chat_jsonl import parse_row

    conv = parse_row(json.dumps(row), "row")
    return render(tok, conv["messages"], conv["tools"]).ids
