"""k2 chat: the terminal chat driven through stdin (click's CliRunner).

* With a `ScriptedEngine` standing in for the model (the `open_chat_engine` test hook): the tool
  loop end to end — the model's call is parsed, run against the tool world of a dataset artifact
  (world.json), shown, and its result fed back into the next prompt; /save, /reset, /quit.
  A random model cannot be relied on to call tools, so this proves the plumbing, not tool use.
* With a real (random) micro model: history, --system, /save, end of input, a context overflow
  that leaves the conversation as it was, clean errors.
"""

import json

import pytest
import torch

from conftest import assert_clean_error
from helpers import PEOPLE, model_artifact
from k2cli.artifacts import ArtifactWriter
from k2cli.data.chat import CALL_ARGS, CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, END
from k2cli.data.tokenizer import train_tokenizer
from k2cli.data.world import build_world, save_world
from k2cli.serve.testing import ScriptedEngine

WORLD = build_world(6, seed=0)
PERSON = WORLD.people[0]
EMPLOYER = WORLD.attributes(PERSON)["employer"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # micro models: threads only contend (see test_serve.py)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def chat():
    """k2 chat in-process, stdin from a string: chat(*args, input=...) -> click Result (exit 0 checked)."""
    from click.testing import CliRunner

    from k2cli.cli import cli

    def run(*args, input: str):
        result = CliRunner().invoke(cli, ["chat", *map(str, args)], input=input, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    return run


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([p.name + " works at " + WORLD.attributes(p)["employer"] for p in WORLD.people] * 5, vocab_size=350)


@pytest.fixture
def world_ref():
    with ArtifactWriter(stage="synth", kind="dataset") as w:
        save_world(WORLD, w.dir / "world.json")
        return w.commit(summary="a world").id.replace("/", ":")


def script(prompt: str) -> str:
    """Look the person up, then answer from the tool's result (which must be in the prompt)."""
    if "## Return of functions.find_person:0" in prompt:
        employer = json.loads(prompt.rsplit("## Return of functions.find_person:0\n", 1)[1].split("<|im_end|>")[0])["employer"]
        return f"{PERSON.name} works at {employer}." + END
    return (f"Let me check.{CALLS_BEGIN}{CALL_BEGIN}functions.find_person:0{CALL_ARGS}"
            f'{{"name": "{PERSON.name}"}}{CALL_END}{CALLS_END}{END}')


@pytest.fixture
def scripted(monkeypatch, tok):
    engine = ScriptedEngine(tok, script, context=4096)
    monkeypatch.setattr("k2cli.stages.serve.open_chat_engine", lambda ref, device="auto": (engine, tok, "scripted"))
    return engine


def test_chat_runs_tool_calls_against_the_world(chat, scripted, world_ref, tmp_path):
    conv, empty = tmp_path / "conv.json", tmp_path / "empty.json"
    stdin = f"Where does {PERSON.name} work?\n/save {conv}\n/reset\n/save {empty}\n/bogus\n/quit\nnever read\n"
    result = chat("any-model", "--tools", world_ref, "--system", "You answer from the directory.", input=stdin)
    text = result.output
    assert f'→ find_person({{"name": "{PERSON.name}"}})' in text  # the call is shown ...
    assert f'"employer": "{EMPLOYER}"' in text  # ... and its result, from world.json
    assert f"assistant> {PERSON.name} works at {EMPLOYER}." in text  # the answer used the result
    assert "unknown command /bogus" in text and "never read" not in text
    saved = json.loads(conv.read_text())
    roles = [m["role"] for m in saved["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    call = saved["messages"][2]["tool_calls"][0]
    assert call["function"] == {"name": "find_person", "arguments": {"name": PERSON.name}}
    assert json.loads(saved["messages"][3]["content"])["employer"] == EMPLOYER
    assert {t["function"]["name"] for t in saved["tools"]} == {"find_person", "city_info", "organisation_info"}
    assert json.loads(empty.read_text())["messages"] == [{"role": "system", "content": "You answer from the directory."}]
    # the tools were declared in the prompt the model saw
    assert '"name":"find_person"' in scripted.prompts[0]  # compact JSON, as K2's template


def test_chat_without_a_tool_world_and_runaway_tool_loops(chat, scripted, tok, tmp_path):
    conv = tmp_path / "conv.json"
    result = chat("any-model", input=f"Hello\nWho?\n/save {conv}\n")  # end of input also ends the chat
    assert "no tool world is loaded" in result.output
    assert "--tools DATASET_REF" in result.output.split("you>")[0]  # the banner says how to get tools
    # no tools declared: the call section is a stop token, so "Hello" gets text, not an unanswerable
    # call, and the next message works (it used to fail until /reset)
    assert "error" not in result.output and result.output.count("assistant> Let me check.") == 2
    saved = json.loads(conv.read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 2 and saved["tools"] is None
    assert not any(m.get("tool_calls") for m in saved["messages"]) and "tool_declare" not in scripted.prompts[-1]

    from k2cli.stages.serve import ChatSession, ChatSettings

    lines = []
    always_calls = ScriptedEngine(tok, lambda prompt: script(""), context=1 << 16)
    session = ChatSession(always_calls, tok, ChatSettings(max_tool_rounds=2), directory_world_from(WORLD), echo_tool=lines.append)
    added = session.say("Loop forever")
    assert [m["role"] for m in added].count("tool") == 3 and "stopped after 2 rounds" in lines[-1]


def directory_world_from(world):
    import tempfile
    from pathlib import Path

    from k2cli.serve.tools import directory_world

    path = Path(tempfile.mkdtemp()) / "world.json"
    save_world(world, path)
    return directory_world(str(path))


def test_tool_execution_never_raises():
    from k2cli.serve.tools import execute

    world = directory_world_from(WORLD)
    assert json.loads(execute(world, "find_person", {"name": PERSON.name.upper()}))["employer"] == EMPLOYER
    assert "unknown tool" in json.loads(execute(world, "launch", {}))["error"]
    assert "no person named" in json.loads(execute(world, "find_person", {"name": "Nobody"}))["error"]
    assert "missing ['name']" in json.loads(execute(world, "city_info", {}))["error"]
    assert "not valid JSON" in json.loads(execute(world, "city_info", "{oops"))["error"]
    assert json.loads(execute(world, "city_info", '{"name": "Oslo"}'))["country"] == "Norway"


def test_chat_with_a_real_micro_model(chat, tmp_path):
    art = model_artifact([f"{n} was born in {c} in {y}." for n, c, y in PEOPLE] * 5)
    saved = tmp_path / "s.json"
    long = "Anna Berg was born in Oslo. " * 200  # far beyond the micro model's 256 positions
    stdin = f"hello\n{long}\n/save {saved}\n"
    result = chat(art.id.replace("/", ":"), "--system", "Be brief.", "--temperature", "0", "--max-tokens", "5", input=stdin)
    assert "error: the conversation is" in result.output and "context is 256" in result.output
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]  # the overflowing turn left no trace
    assert messages[1]["content"] == "hello" and isinstance(messages[2]["content"], str)


def test_chat_clean_errors(k2, tmp_path):
    assert_clean_error(k2("chat", str(tmp_path / "nope"), ok=False), "nope")
    art = model_artifact(["some text"] * 20)
    assert_clean_error(k2("chat", art.id.replace("/", ":"), "--tools", str(tmp_path / "missing"), ok=False), "missing")


def test_device_auto_is_the_default(monkeypatch, k2):
    """serve and chat pick cuda when torch sees a GPU (they used to default to cpu even then)."""
    import torch

    from k2cli.stages import serve

    assert serve.resolve_device("cpu") == "cpu" and serve.resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert serve.resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert serve.resolve_device("auto") == "cuda"
    for cmd in (serve.serve_cmd, serve.chat_cmd):
        assert next(p.default for p in cmd.params if p.name == "device") == "auto"
    seen = []
    monkeypatch.setattr(serve, "open_chat_engine", lambda ref, device: seen.append(device) or (_ for _ in ()).throw(SystemExit(0)))
    k2("chat", "any-model", ok=False)
    assert seen == ["auto"]


def test_load_failure_hint_fits_the_device(monkeypatch):
    from k2cli.errors import K2Error
    from k2cli.stages import serve

    def broken(ref, device):
        raise RuntimeError("Error(s) in loading state_dict: size mismatch for embed.weight\nmore")

    monkeypatch.setattr("k2cli.model.io.load_model", broken)
    with pytest.raises(K2Error) as e:
        serve.load_chat_model("m", "cpu")
    assert "--device cpu" not in e.value.line() and "size mismatch" in e.value.line() and "\n" not in e.value.line()
    with pytest.raises(K2Error) as e:
        serve.load_chat_model("m", "cuda:7")
    assert "pass --device cpu" in e.value.line()
