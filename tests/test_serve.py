"""k2 serve: the batching engine, turn decoding, and the OpenAI-compatible server over loopback HTTP.

What each group proves:
  * engine        — continuous batching gives exactly what `generate()` gives for each prompt alone
                    (greedy), with staggered arrivals and a full batch; n/seed/cancel behave.
  * turn decoding — streamed content, stop strings, tool-call parsing on real tokenizer output.
  * real server   — a random micro model served by uvicorn on 127.0.0.1, spoken to with the official
                    `openai` client: plain, streaming, n > 1, concurrency, every error, a disconnect
                    that frees its slot, and `k2 serve` as a real process. A random model cannot be
                    made to call tools, so these prove the plumbing, not tool use.
  * tool calls    — a `ScriptedEngine` (the documented test hook, k2cli.serve.testing) stands in for
                    the engine and emits fixed token sequences: the tool-call round trip, streaming
                    tool calls and tool_choice are exercised deterministically through the real
                    rendering, parser and response assembly.
  * the rephrase stage's `openai` backend against a live k2 serve.
"""

import ast
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

from helpers import MICRO, PEOPLE
from k2cli.artifacts import ArtifactWriter
from k2cli.data.chat import CALL_ARGS, CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, END, render
from k2cli.data.tokenizer import load_tokenizer, train_tokenizer
from k2cli.model.config import ModelConfig
from k2cli.model.generate import generate
from k2cli.model.io import load_model, save_model_files
from k2cli.model.transformer import build_model
from k2cli.serve.engine import Engine, SamplingParams
from k2cli.serve.turns import TurnDecoder, build_prompt, encode_with_specials

TOOLS = [{"type": "function", "function": {"name": "find_person", "description": "Look up a person by name.",
          "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}]
CALL_TEXT = (f'Let me look.{CALLS_BEGIN}{CALL_BEGIN}functions.find_person:0{CALL_ARGS}{{"name": "Anna Berg"}}'
             f"{CALL_END}{CALLS_END}{END}")


def make_micro(directory, texts, sharpen: float = 10.0, **config):
    """A random micro model + tokenizer as an artifact at `directory`.

    The LM head is scaled by `sharpen`: a freshly initialised head gives near-uniform logits whose
    argmax can flip with the float rounding of a different batch shape; sharper logits make greedy
    decoding a stable reference without changing anything the tests look at.
    """
    tok = train_tokenizer(list(texts), vocab_size=400)
    cfg = ModelConfig(name="micro", **(MICRO | config) | {"vocab_size": tok.vocab_size, "eos_token_id": tok.eot_id})
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    with ArtifactWriter(stage="serve-test", kind="model", out=str(directory)) as w:
        save_model_files(model, w.dir)
        tok.save(w.dir)
        return w.commit(summary="serve test model")


def corpus():
    from k2cli.data.chat import render_text

    bios = [f"{n} was born in {c} in {y}. {n} lives in {c}." for n, c, y in PEOPLE]
    try:  # the rephrase prompts, so that they encode compactly (test_rephrase_openai_backend_against_k2_serve)
        from k2cli.data.rephrase.styles import STYLES, build_messages

        prompts = [render_text(build_messages(s, bios[0], ""), None) for s in STYLES]
    except ImportError:
        prompts = []
    return (bios + [render_text([{"role": "user", "content": "hi"}], TOOLS), CALL_TEXT]) * 4 + prompts


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro models gain nothing from intra-op threads, and on a busy 2-core machine two threads
    spinning against each other (and against the server's threads) make every step 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    art = make_micro(tmp_path_factory.mktemp("serve") / "micro", corpus(), max_position_embeddings=1024)
    model, _ = load_model(art.path)
    return art, model, load_tokenizer(art.path)


# ----------------------------------------------------------------------------- the engine (no HTTP)


def run_engine(engine, jobs, stagger: int = 0):
    """Submit (prompt, params, n) jobs, `stagger` steps apart; step until done. -> {job: {choice: tokens}}"""
    out = {i: {} for i in range(len(jobs))}

    def sink(i):
        return lambda events: [out[i].setdefault(c, []).append(v) for k, c, v in events if k == "token"]

    for i, (prompt, params, n) in enumerate(jobs):
        engine.submit(prompt, params, n, sink(i))
        for _ in range(stagger if i % 2 else 0):
            engine.step()
    while engine.active:
        engine.step()
    return out


def test_engine_continuous_batching_matches_generate(micro):
    _, model, _ = micro
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 300, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist() for _ in range(9)]
    budgets = [int(b) for b in torch.randint(1, 24, (9,), generator=g)]
    alone = [generate(model, [p], max_new_tokens=m)[0] for p, m in zip(prompts, budgets)]
    engine = Engine(model, max_batch=4)  # fewer rows than requests: some wait, join mid-flight, rows get reused
    got = run_engine(engine, [(p, SamplingParams(max_tokens=m), 1) for p, m in zip(prompts, budgets)], stagger=3)
    assert [got[i][0] for i in range(9)] == alone
    assert engine.stats["max_rows"] == 4 and engine.running_rows == 0 and engine.stats["cancelled"] == 0


def test_engine_n_choices_seeded_and_stop_ids(micro):
    _, model, _ = micro
    engine = Engine(model, max_batch=8)
    params = SamplingParams(max_tokens=12, temperature=1.5, seed=123)
    a = run_engine(engine, [([5, 6, 7], params, 3)])[0]
    b = run_engine(engine, [([5, 6, 7], params, 3)])[0]
    assert sorted(a) == [0, 1, 2] and a == b  # same seed, same draws, whatever shares the batch
    assert all(len(t) == 12 for t in a.values())
    # a stop id ends a choice with that token included
    greedy = run_engine(engine, [([5, 6, 7], SamplingParams(max_tokens=12), 1)])[0][0]
    stopped = run_engine(engine, [([5, 6, 7], SamplingParams(max_tokens=12, stop_ids=(greedy[2],)), 1)])[0][0]
    assert stopped == greedy[: greedy.index(greedy[2]) + 1]


def test_engine_cancel_frees_rows(micro):
    _, model, _ = micro
    engine = Engine(model, max_batch=4)
    events = []
    req = engine.submit([1, 2, 3], SamplingParams(max_tokens=100), 2, events.extend)
    for _ in range(3):
        engine.step()
    assert engine.active == 1 and engine.running_rows == 2
    engine.cancel(req)
    engine.step()
    assert engine.active == 0 and engine.running_rows == 0 and engine.stats["cancelled"] == 1
    assert not any(k == "done" for k, _, _ in events)


class Flaky(torch.nn.Module):
    """The micro model, failing its forward while `fail` is set (an out-of-memory, say)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.fail = model, model.config, False

    def forward(self, *args, **kw):
        if self.fail:
            raise RuntimeError("simulated failure")
        return self.inner(*args, **kw)


def test_engine_survives_a_failing_forward(micro, capsys):
    _, model, _ = micro
    flaky = Flaky(model)
    engine = Engine(flaky, max_batch=4)
    events = []
    engine.submit([1, 2, 3], SamplingParams(max_tokens=5), 2, events.extend)
    engine.step()  # prefill + first decode
    flaky.fail = True
    engine.submit([4, 5], SamplingParams(max_tokens=5), 1, events.extend)  # admitted in the failing step
    engine.step()
    errors = sorted(e for e in events if e[0] == "error")  # both requests, every choice
    assert errors == [("error", 0, "RuntimeError: simulated failure")] * 2 + [("error", 1, "RuntimeError: simulated failure")]
    assert engine.active == 0 and engine.running_rows == 0
    flaky.fail = False  # the engine goes on serving
    assert len(run_engine(engine, [([1, 2, 3], SamplingParams(max_tokens=4), 1)])[0][0]) == 4


# ----------------------------------------------------------------------------- turn decoding


def decode_all(tok, text, **kw):
    d = TurnDecoder(tok, **kw)
    deltas = "".join(d.feed(t) for t in encode_with_specials(tok, text)) + d.flush()
    return d, deltas


def test_turn_decoder_content_and_tool_calls(micro):
    tok = micro[2]
    d, deltas = decode_all(tok, CALL_TEXT)
    turn = d.finish("stop")
    assert deltas == turn.content == "Let me look."
    assert turn.finish_reason == "tool_calls" and not turn.errors
    assert turn.tool_calls == [{"id": "functions.find_person:0", "type": "function",
                                "function": {"name": "find_person", "arguments": '{"name": "Anna Berg"}'}}]
    d, _ = decode_all(tok, CALL_TEXT, allow_tools=False)  # tool_choice none: a call is not a call
    assert d.finish("stop").tool_calls == []


def test_turn_decoder_stop_strings_whitespace_and_broken_calls(micro):
    tok = micro[2]
    d, deltas = decode_all(tok, "  Anna lives in Oslo. Lima is far.", stop=["Lima", "zzz"])
    assert d.stopped and deltas == "Anna lives in Oslo." == d.finish("length").content
    assert d.finish("length").finish_reason == "stop"
    d, deltas = decode_all(tok, f"Hi.{CALLS_BEGIN}{CALL_BEGIN}functions.find_person:0{CALL_ARGS}{{bad json")
    turn = d.finish("length")  # cut inside a call: no call, the reason says why
    assert deltas == "Hi." and turn.finish_reason == "length" and turn.tool_calls == []
    d, _ = decode_all(tok, f"{CALLS_BEGIN}{CALL_BEGIN}nonsense{CALL_ARGS}{{}}{CALL_END}{CALLS_END}{END}")
    turn = d.finish("stop")
    assert turn.finish_reason == "stop" and turn.tool_calls == [] and "bad tool call id" in turn.errors[0]


def test_build_prompt_tool_choice(micro):
    tok = micro[2]
    msgs = [{"role": "user", "content": "Where does Anna Berg live?"}]
    auto = build_prompt(tok, msgs, TOOLS)
    assert auto.ids == render(tok, msgs, TOOLS, add_generation_prompt=True).ids and auto.allow_tools
    named = build_prompt(tok, msgs, TOOLS, {"type": "function", "function": {"name": "find_person"}})
    assert tok.decode(named.ids).endswith(f"{CALLS_BEGIN}{CALL_BEGIN}functions.find_person:0{CALL_ARGS}")
    assert tok.token_id(CALLS_BEGIN) in build_prompt(tok, msgs, TOOLS, "none").stop_ids
    from k2cli.errors import K2Error

    with pytest.raises(K2Error, match="not among the tools"):
        build_prompt(tok, msgs, TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(K2Error, match="needs tools"):
        build_prompt(tok, msgs, None, "required")


# ----------------------------------------------------------------------------- the HTTP server

# The server needs the `serve` extra (fastapi, uvicorn) and the tests the `openai` client; without
# them every test below skips (the engine and decoding tests above still run).
try:
    import openai

    from k2cli.serve.app import create_app
    from k2cli.serve.server import BackgroundServer

    HAVE_SERVE = True
except ImportError:
    HAVE_SERVE = False
from k2cli.serve.testing import ScriptedEngine  # noqa: E402

needs_serve = pytest.mark.skipif(not HAVE_SERVE, reason="pip install 'k2cli[serve]' openai to test the server")

NAME = "micro/v1"


@pytest.fixture(scope="module")
def real(micro):
    art, model, tok = micro
    engine = Engine(model, max_batch=16).start()
    app = create_app(engine, tok, NAME, aliases={str(art.path)}, default_max_tokens=16)
    with BackgroundServer(app) as server:
        yield server, engine, model, tok
    engine.stop()


def client_for(server, key="none", timeout=60.0):
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=timeout)


def raw(method: str, url: str, body=None, headers=None):
    """A plain HTTP request (for what the openai client will not send): -> (status, headers, text)."""
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


USER = [{"role": "user", "content": "Where was Anna Berg born?"}]


def reference(model, tok, messages, max_tokens, tools=None):
    """What the model itself writes for these messages (greedy), decoded the way the server decodes."""
    prompt = build_prompt(tok, messages, tools)
    ids = generate(model, [prompt.ids], max_new_tokens=max_tokens, stop_ids=prompt.stop_ids)[0]
    d = TurnDecoder(tok)
    for t in ids:
        d.feed(t)
    return d.finish("stop" if ids[-1] in prompt.stop_ids else "length"), len(prompt.ids), len(ids)


@needs_serve
def test_models_and_plain_completion(real):
    server, engine, model, tok = real
    client = client_for(server)
    assert [m.id for m in client.models.list()] == [NAME]
    r = client.chat.completions.create(model=NAME, messages=USER, max_tokens=10, temperature=0)
    turn, P, N = reference(model, tok, USER, 10)
    assert r.object == "chat.completion" and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == turn.content
    assert r.choices[0].finish_reason == turn.finish_reason in ("stop", "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (P, N, P + N)
    # the artifact path is accepted as the model name too; no max_tokens: the server's default budget
    r = client.chat.completions.create(model=str(client.models.list().data[0].id), messages=USER, temperature=0)
    assert r.usage.completion_tokens <= 16


@needs_serve
def test_streaming_matches_non_streaming(real):
    server, engine, model, tok = real
    client = client_for(server)
    plain = client.chat.completions.create(model=NAME, messages=USER, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=USER, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


@needs_serve
def test_raw_sse_ends_with_done(real):
    server = real[0]
    body = {"model": NAME, "messages": USER, "max_tokens": 3, "stream": True}
    status, headers, text = raw("POST", server.base_url + "/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    lines = [line for line in text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"


@needs_serve
def test_n_choices_seed_and_sampling(real):
    server = real[0]
    client = client_for(server)
    kw = dict(model=NAME, messages=USER, max_tokens=8, temperature=1.2, top_p=0.9, seed=7, n=3)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded: reproducible
    assert 3 <= a.usage.completion_tokens <= 3 * 8
    streamed = list(client.chat.completions.create(**kw, stream=True))
    assert {c.choices[0].index for c in streamed if c.choices} == {0, 1, 2}
    for i in range(3):
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i)
        assert text == a.choices[i].message.content


@needs_serve
def test_concurrent_requests_are_correct(real):
    server, engine, model, tok = real
    client = client_for(server)
    questions = [[{"role": "user", "content": f"Where was {n} born?"}] for n, _, _ in PEOPLE]
    want = [reference(model, tok, q, 10)[0].content for q in questions]
    got = [None] * len(questions)

    def ask(i):
        got[i] = client.chat.completions.create(model=NAME, messages=questions[i], max_tokens=10, temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want  # whatever shares a batch, each prompt gets what it gets alone


@needs_serve
def test_errors_follow_the_openai_protocol(real):
    server, engine, model, tok = real
    client = client_for(server)
    url = server.base_url + "/chat/completions"

    status, _, text = raw("POST", url, b"{not json")
    assert status == 400 and json.loads(text)["error"]["code"] == "invalid_json"
    assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    status, _, text = raw("POST", url, [1, 2])
    assert status == 400 and "JSON object" in json.loads(text)["error"]["message"]
    status, _, text = raw("POST", url, {"model": NAME})
    assert status == 400 and json.loads(text)["error"]["param"] == "messages"

    def bad(**kw):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**({"model": NAME, "messages": USER} | kw))
        assert e.value.status_code == 400
        return e.value.body

    assert bad(temperature=5)["param"] == "temperature"
    assert bad(messages=[{"role": "wizard", "content": "x"}])["param"].startswith("messages")
    assert bad(n=0)["param"] == "n"
    assert "tool result" in bad(messages=USER + [{"role": "tool", "tool_call_id": "functions.x:0", "content": "1"}])["message"]
    assert "not among the tools" in bad(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})["message"]
    assert bad(top_logprobs=3)["param"] == "top_logprobs"  # needs logprobs: true
    assert bad(logprobs=True, top_logprobs=21)["param"] == "top_logprobs"
    assert bad(response_format={"type": "json_object"})["code"] == "unsupported_parameter"
    long = [{"role": "user", "content": "Anna Berg was born in Oslo. " * 400}]
    body = bad(messages=long)
    assert body["code"] == "context_length_exceeded" and "maximum context length is 1024 tokens" in body["message"]
    body = bad(max_tokens=5000)
    assert body["code"] == "context_length_exceeded" and "5000 in the completion" in body["message"]

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert e.value.body["code"] == "model_not_found" and NAME in e.value.body["message"]
    status, _, text = raw("GET", server.base_url + "/nowhere")
    assert status == 404 and "error" in json.loads(text)
    assert engine.active == 0  # nothing was queued by a rejected request


@needs_serve
def test_busy_server_answers_429(micro):
    _, model, tok = micro
    engine = Engine(model, max_batch=1)  # never started: nothing leaves its queue
    engine.submit([1, 2, 3], SamplingParams(max_tokens=1))
    with BackgroundServer(create_app(engine, tok, NAME, max_waiting=1)) as server:
        with pytest.raises(openai.RateLimitError) as e:
            client_for(server).chat.completions.create(model=NAME, messages=USER)
        assert e.value.body["code"] == "server_busy" and e.value.response.headers["retry-after"] == "1"
    assert engine.waiting == 1  # the rejected request was never queued


@needs_serve
def test_generation_failure_is_a_500(micro):
    _, model, tok = micro
    flaky = Flaky(model)
    flaky.fail = True
    engine = Engine(flaky, max_batch=4).start()
    with BackgroundServer(create_app(engine, tok, NAME)) as server:
        with pytest.raises(openai.InternalServerError) as e:
            client_for(server).chat.completions.create(model=NAME, messages=USER, max_tokens=3)
        assert e.value.body["type"] == "server_error" and "simulated failure" in e.value.body["message"]
        flaky.fail = False
        assert client_for(server).chat.completions.create(model=NAME, messages=USER, max_tokens=3).usage.completion_tokens >= 1
    engine.stop()


@needs_serve
def test_api_key(micro):
    art, model, tok = micro
    app = create_app(ScriptedEngine(tok, lambda prompt: "ok" + END), tok, NAME, api_key="s3cret")
    with BackgroundServer(app) as server:
        assert client_for(server, "s3cret").chat.completions.create(model=NAME, messages=USER).choices[0].message.content == "ok"
        with pytest.raises(openai.AuthenticationError) as e:
            client_for(server, "wrong").models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        status, _, text = raw("GET", server.base_url + "/models")  # no Authorization header at all
        assert status == 401 and json.loads(text)["error"]["code"] == "missing_api_key"
        status, _, text = raw("GET", server.base_url + "/models", headers={"Authorization": "Basic czNjcmV0"})
        assert status == 401
        assert json.loads(raw("GET", server.base_url.removesuffix("/v1") + "/health")[2])["status"] == "ok"


class Endless(torch.nn.Module):
    """The micro model, 20 ms slower per forward and never ending its turn: a stream that is surely
    still running when the client leaves."""

    def __init__(self, model, banned):
        super().__init__()
        self.inner, self.config, self.banned = model, model.config, list(banned)

    def forward(self, *args, **kw):
        time.sleep(0.02)
        logits = self.inner(*args, **kw)
        logits[..., self.banned] = float("-inf")
        return logits


def wait_until(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@needs_serve
def test_client_disconnect_frees_its_slot(micro, caplog):
    import logging

    caplog.set_level(logging.INFO)
    art, model, tok = micro
    banned = [tok.token_id(t) for t in ("<|im_end|>", "<|endoftext|>", CALLS_BEGIN)]
    engine = Engine(Endless(model, banned), max_batch=4).start()
    with BackgroundServer(create_app(engine, tok, NAME)) as server:
        client = client_for(server)
        stream = client.chat.completions.create(model=NAME, messages=USER, max_tokens=500, temperature=0, stream=True)
        it = iter(stream)
        for _ in range(4):  # the role chunk, then content: generation is under way
            next(it)
        assert engine.active == 1 and engine.running_rows == 1
        stream.close()  # the client goes away mid-stream
        assert wait_until(lambda: engine.active == 0), "the stream's row was not freed"
        assert engine.running_rows == 0 and engine.stats["cancelled"] == 1 and engine.stats["tokens"] < 500
        # a non-streaming client that gives up is noticed too
        with pytest.raises(openai.APITimeoutError):
            client_for(server, timeout=0.5).chat.completions.create(model=NAME, messages=USER, max_tokens=500)
        assert wait_until(lambda: engine.active == 0) and engine.stats["cancelled"] == 2
        assert wait_until(lambda: not server.server.server_state.tasks), "a request handler was left waiting"
    engine.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


# ----------------------------------------------------------------------------- tool calls (scripted engine)


def tool_script(prompt: str) -> str:
    """Call find_person first; answer once the tool's result is in the conversation."""
    if "## Return of functions.find_person:0" in prompt:
        return "Anna Berg was born in Oslo." + END
    if prompt.endswith(CALL_ARGS):  # tool_choice named a function: the id is pre-filled
        return '{"name": "Anna Berg"}' + CALL_END + CALLS_END + END
    return CALL_TEXT


@pytest.fixture
def scripted(micro):
    tok = micro[2]
    engine = ScriptedEngine(tok, tool_script, context=1024)
    with BackgroundServer(create_app(engine, tok, NAME)) as server:
        yield server, engine, tok


@needs_serve
def test_tool_call_round_trip(scripted):
    server, engine, tok = scripted
    client = client_for(server)
    messages = [{"role": "system", "content": "You look people up."}, *USER]
    r = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    (call,) = choice.message.tool_calls
    assert (call.id, call.type, call.function.name) == ("functions.find_person:0", "function", "find_person")
    assert json.loads(call.function.arguments) == {"name": "Anna Berg"}  # arguments: a JSON string, OpenAI style
    assert '"name":"find_person"' in engine.prompts[-1]  # the tools were declared to the model (compact JSON, as K2's template)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"birth_city": "Oslo"})}]
    r = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "Anna Berg was born in Oslo."
    assert r.choices[0].message.tool_calls is None
    # the assistant's call and the tool's result were rendered back in k2's format
    assert f'{CALL_BEGIN}functions.find_person:0{CALL_ARGS}{{"name": "Anna Berg"}}{CALL_END}' in engine.prompts[-1]
    assert '## Return of functions.find_person:0\n{"birth_city": "Oslo"}' in engine.prompts[-1]


@needs_serve
def test_tool_call_streaming_and_tool_choice(scripted):
    server, engine, tok = scripted
    client = client_for(server)
    chunks = list(client.chat.completions.create(model=NAME, messages=USER, tools=TOOLS, stream=True, n=2))
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(c.delta.content or "" for c in mine) == "Let me look."
        calls = [tc for c in mine for tc in c.delta.tool_calls or []]
        assert [(tc.index, tc.id, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == \
            [(0, "functions.find_person:0", "find_person", {"name": "Anna Berg"})]
        assert mine[-1].finish_reason == "tool_calls"
    # none: the call section is a stop token, so the turn ends as text
    r = client.chat.completions.create(model=NAME, messages=USER, tools=TOOLS, tool_choice="none")
    assert (r.choices[0].finish_reason, r.choices[0].message.content, r.choices[0].message.tool_calls) == ("stop", "Let me look.", None)
    # a named function: the call is pre-filled up to its arguments, the model (script) writes them
    r = client.chat.completions.create(model=NAME, messages=USER, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "find_person"}})
    assert engine.prompts[-1].endswith(f"{CALL_BEGIN}functions.find_person:0{CALL_ARGS}")
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.tool_calls[0].function.name == "find_person"
    # stop strings and max_tokens apply to scripted tokens exactly as to a model's
    r = client.chat.completions.create(model=NAME, messages=USER, tools=TOOLS, stop=[" look"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Let me", "stop")
    r = client.chat.completions.create(model=NAME, messages=USER, tools=TOOLS, max_tokens=6)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None
    assert wait_until(lambda: engine.active == 0)


@needs_serve
def test_real_model_with_tools_smoke(real):
    """A random model with tools and a forced call: the response is well-formed whatever it writes."""
    server = real[0]
    r = client_for(server).chat.completions.create(model=NAME, messages=USER, tools=TOOLS, tool_choice="required",
                                                   max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    for call in r.choices[0].message.tool_calls or []:
        assert isinstance(json.loads(call.function.arguments), dict)


# ----------------------------------------------------------------------------- other clients, the real process


@needs_serve
def test_rephrase_openai_backend_against_k2_serve(real, monkeypatch):
    from k2cli.data.rephrase.backends import BackendConfig, RewriteRequest
    from k2cli.data.rephrase.openai_backend import OpenAIBackend
    from k2cli.data.rephrase.styles import build_messages

    server, engine, model, tok = real
    cfg = BackendConfig(name="openai", base_url=server.base_url, model=NAME, temperature=0.0, max_new_tokens=8,
                        concurrency=3, cache=False)
    backend = OpenAIBackend(cfg)
    chunk = "Anna Berg was born in Oslo in 1987."
    reqs = [RewriteRequest(messages=build_messages(s, chunk, ""), style=s, kind="knowledge", chunk=chunk, context="", seed=i)
            for i, s in enumerate(["encyclopedic", "news", "timeline"])]
    texts = backend.rewrite(reqs)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert backend.embed(["a", "b"]) is None  # k2 serve has no /embeddings: the backend records none
    assert backend.stats["http_requests"] >= 3 and backend.stats["retries"] == 0


def test_agentic_openai_agent_against_k2_serve(real, k2):
    """`k2 agentic --agent openai` drives its episodes through a live k2 serve. A random model does
    not solve tasks, so every episode comes back and is rejected by the judge, counted by reason,
    and the stage refuses to write an empty dataset with one clear line."""
    server, engine = real[0], real[1]
    k2("data", "synth", "--preset", "micro")
    prefills = engine.stats["prefills"]
    r = k2("agentic", "synth:latest", "--preset", "micro", "--agent", "openai", "--base-url", server.base_url,
           "--model", NAME, "--set", "agents.count=2", "--set", "agents.test_count=0",
           "--set", 'tasks.templates=["weekday"]', "--set", "policy.max_new_tokens=8", "--set", "episode.max_turns=2", ok=False)
    assert r.exit_code == 2 and "no trajectory passed the judge" in r.output, r.output
    counts = ast.literal_eval(re.search(r"judge \((\{.*?\})\)", r.output).group(1))  # {reason: episodes}
    assert sum(counts.values()) >= 2, r.output
    assert engine.stats["prefills"] > prefills  # the turns were decoded by the served model


@needs_serve
def test_k2_serve_process(micro, tmp_path):
    art = micro[0]
    env = os.environ | {"K2_API_KEY": "k", "K2_QUIET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "k2cli.cli", "serve", str(art.path), "--port", "0", "--name", "m"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().strip()  # the first line of stdout is the URL, once the port is bound
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1"), proc.stderr.read()
        server = type("S", (), {"base_url": url})
        r = client_for(server, "k").chat.completions.create(model="m", messages=USER, max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 4
        with pytest.raises(openai.AuthenticationError):
            client_for(server, "nope").models.list()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@needs_serve
def test_k2_serve_clean_errors(k2, tmp_path):
    import socket

    from conftest import assert_clean_error

    assert_clean_error(k2("serve", str(tmp_path / "missing"), "--port", 0, ok=False), "missing")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_clean_error(k2("serve", str(tmp_path / "missing"), "--port", port, ok=False), "cannot listen", "--port")


# ----------------------------------------------------------------------------- hostile clients (loopback, bounded)


class Gated:
    """A tokenizer whose encode blocks on text containing GATE until released: a stand-in for the
    seconds a huge conversation takes to tokenise, without the seconds."""

    GATE = "GATE-GATE"

    def __init__(self, tok):
        self.tok, self.entered, self.release = tok, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, text):
        if self.GATE in text:
            self.entered.set()
            assert self.release.wait(30)
        return self.tok.encode(text)


def sock_to(server):
    import socket

    host, port = server.base_url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def read_response(s) -> tuple[int, bytes]:
    """Status and everything the server sent until it closed the connection (or 10 s passed).
    A reset after the response counts as closed (the server hung up with our bytes unread)."""
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return int(data.split(b" ", 2)[1]) if data else 0, data


def post_head(path: str, length: int | None = None, extra: str = "") -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{size}{extra}\r\n".encode()


@needs_serve
def test_body_limit_before_reading(micro):
    tok = micro[2]
    app = create_app(ScriptedEngine(tok, lambda p: "ok" + END, context=1 << 17), tok, NAME, max_body_bytes=64 << 10)
    with BackgroundServer(app) as server:
        with sock_to(server) as s:  # 16 MB declared, not a byte of it sent: refused from the head alone
            s.sendall(post_head("/v1/chat/completions", 16 << 20))
            status, data = read_response(s)  # ... and the server hangs up (it will not read 16 MB)
        assert status == 413 and b"request_too_large" in data and b"connection: close" in data.lower()
        with sock_to(server) as s:  # chunked: counted as it arrives, cut at the limit
            s.sendall(post_head("/v1/chat/completions"))
            chunk = b"x" * 8192
            for _ in range(9):  # 72 KiB: just over
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            status, data = read_response(s)
        assert status == 413 and b"body is over " in data
        body = {"model": NAME, "messages": [{"role": "user", "content": "x" * 60_000}]}  # under the limit: served
        assert raw("POST", server.base_url + "/chat/completions", body)[0] == 200


@needs_serve
def test_hostile_json_is_a_400(micro):
    tok = micro[2]
    engine = ScriptedEngine(tok, lambda p: "ok" + END)
    url_path = "/chat/completions"
    probes = {
        "escaped lone surrogate": b'{"model": "micro/v1", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
        "surrogate in the model name": b'{"model": "\\udfff", "messages": [{"role": "user", "content": "a"}]}',
        "raw surrogate bytes": b'{"model": "micro/v1", "messages": [{"role": "user", "content": "a\xed\xa0\x80"}]}',
        "invalid utf-8": b'{"model": "micro/v1", "messages": [{"role": "user", "content": "\xff"}]}',
        "[ x 100000": b"[" * 100_000,
        "{ x 100000": b'{"a":' * 100_000,
        "deep in tools": b'{"model": "micro/v1", "messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function", '
                         b'"function": {"name": "f", "parameters": ' + b'{"a":' * 900 + b"1" + b"}" * 900 + b"}}]}",
        "NaN": b'{"model": "micro/v1", "messages": [{"role": "user", "content": "a"}], "temperature": NaN}',
        "Infinity": b'{"model": "micro/v1", "messages": [{"role": "user", "content": "a"}], "top_p": Infinity}',
        "empty body": b"",
        "a string": b'"hello"',
        "messages a string": b'{"model": "micro/v1", "messages": "hi"}',
        "content a number": b'{"model": "micro/v1", "messages": [{"role": "user", "content": 5}]}',
        "content parts wrong": b'{"model": "micro/v1", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
        "content parts not dicts": b'{"model": "micro/v1", "messages": [{"role": "user", "content": [1, 2]}]}',
        "tool_calls wrong": b'{"model": "micro/v1", "messages": [{"role": "assistant", "tool_calls": [{"id": 1}]}, '
                            b'{"role": "user", "content": "a"}]}',
        "arguments a list": b'{"model": "micro/v1", "messages": [{"role": "assistant", "tool_calls": [{"id": "functions.f:0", '
                            b'"function": {"name": "f", "arguments": [1]}}]}, {"role": "tool", "tool_call_id": "functions.f:0", "content": "1"}]}',
        "tools a dict": b'{"model": "micro/v1", "messages": [{"role": "user", "content": "a"}], "tools": {"a": 1}}',
        "tool_choice a number": b'{"model": "micro/v1", "messages": [{"role": "user", "content": "a"}], "tool_choice": 3}',
        "stop a number": b'{"model": "micro/v1", "messages": [{"role": "user", "content": "a"}], "stop": 3}',
        "seed a string": b'{"model": "micro/v1", "messages": [{"role": "user", "content": "a"}], "seed": "x"}',
        "max_tokens huge": b'{"model": "micro/v1", "messages": [{"role": "user", "content": "a"}], "max_tokens": 1' + b"0" * 40 + b"}",
        "n a float": b'{"model": "micro/v1", "messages": [{"role": "user", "content": "a"}], "n": 1.5}',
        "model a list": b'{"model": ["micro/v1"], "messages": [{"role": "user", "content": "a"}]}',
        "stream_options a string": b'{"model": "micro/v1", "messages": [{"role": "user", "content": "a"}], "stream": true, "stream_options": "x"}',
        "Content-Length not a number": None,
    }
    with BackgroundServer(create_app(engine, tok, NAME)) as server:
        for name, body in probes.items():
            if body is None:
                with sock_to(server) as s:
                    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n")
                    status, text = read_response(s)
            else:
                status, _, text = raw("POST", server.base_url + url_path, body)
            assert status == 400, (name, status, text)
            if body is not None:
                assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}, name
        # a conversation too long for the context is refused by its size, before it is tokenised
        body = {"model": NAME, "messages": [{"role": "user", "content": "Anna " * 400_000}]}
        status, _, text = raw("POST", server.base_url + url_path, body)
        assert status == 400 and json.loads(text)["error"]["code"] == "context_length_exceeded" and "characters" in text
        # pairs are fine, and the server is alive and well after all that
        good = b'{"model": "micro/v1", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
        assert raw("POST", server.base_url + url_path, good)[0] == 200


@needs_serve
def test_preparation_runs_off_the_event_loop(micro):
    """While one request is being tokenised (held inside the tokenizer), other clients are served."""
    tok = micro[2]
    gated = Gated(tok)
    app = create_app(ScriptedEngine(tok, lambda p: "ok" + END), gated, NAME)
    with BackgroundServer(app) as server:
        client = client_for(server, timeout=10)
        slow = {}
        t = threading.Thread(target=lambda: slow.setdefault("r", client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": f"{Gated.GATE} please"}])))
        t.start()
        try:
            assert gated.entered.wait(10)
            # the gated request sits in the tokenizer; on the loop, these would wait for it (and time out)
            assert client.models.list().data[0].id == NAME
            r = client.chat.completions.create(model=NAME, messages=USER)
            assert r.choices[0].message.content == "ok" and "r" not in slow
        finally:
            gated.release.set()
            t.join(30)
        assert slow["r"].choices[0].message.content == "ok"


@needs_serve
def test_idle_half_open_and_slow_loris_connections_are_closed(micro):
    tok = micro[2]
    app = create_app(ScriptedEngine(tok, lambda p: "ok" + END), tok, NAME, body_timeout=0.5)
    with BackgroundServer(app, header_timeout=0.5, keep_alive=0.5) as server:
        with sock_to(server) as s:  # half-open: connects, says nothing
            assert s.recv(1) == b""
        with sock_to(server) as s:  # slow loris: a header byte every 0.1 s, never done
            closed = False
            for _ in range(100):  # at most 10 s
                try:
                    s.sendall(b"X-Slow: y\r\n"[:1] if _ else b"GET /v1/models HTTP/1.1\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                time.sleep(0.1)
            assert closed or s.recv(1) == b""
        with sock_to(server) as s:  # a body that stops halfway: 408, then the connection closes
            s.sendall(post_head("/v1/chat/completions", 100) + b'{"model": ')
            status, data = read_response(s)
            assert status == 408 and b"request_timeout" in data
        with sock_to(server) as s:  # kept alive after a response, then idle: closed
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, data = read_response(s)
            assert status == 200 and b'"status":"ok"' in data
        assert wait_until(lambda: not server.server.server_state.connections)


@needs_serve
def test_nodelay_and_quiet_disconnects(micro, caplog):
    import logging
    import socket

    tok = micro[2]
    app = create_app(ScriptedEngine(tok, lambda p: "ok" + END), tok, NAME)
    with BackgroundServer(app) as server, caplog.at_level(logging.INFO):
        with sock_to(server) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            (conn,) = server.server.server_state.connections
            sock = conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1  # no 40 ms Nagle/delayed-ACK stall
        with sock_to(server) as s:  # a client that leaves halfway through its body
            s.sendall(post_head("/v1/chat/completions", 1000) + b'{"model": ')
            time.sleep(0.2)
        assert wait_until(lambda: not server.server.server_state.tasks)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


@needs_serve
def test_tool_calls_only_when_tools_are_declared(scripted):
    server, engine, tok = scripted
    client = client_for(server)
    r = client.chat.completions.create(model=NAME, messages=USER)  # the script writes a call; no tools were declared
    assert (r.choices[0].message.content, r.choices[0].message.tool_calls, r.choices[0].finish_reason) == ("Let me look.", None, "stop")
    assert "tool_declare" not in engine.prompts[-1]
    chunks = list(client.chat.completions.create(model=NAME, messages=USER, stream=True))
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)



# ----------------------------------------------------------------------------- logprobs and /v1/completions (real model)


def first_logprobs(model, ids):
    """log_softmax of the model's next-token logits after `ids` (the reference for the first token)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), -1)


@needs_serve
def test_chat_logprobs(real):
    server, engine, model, tok = real
    client = client_for(server)
    kw = dict(model=NAME, messages=USER, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw)
    entries = r.choices[0].logprobs.content
    ref = first_logprobs(model, build_prompt(tok, USER).ids)
    top = ref.topk(3)
    assert entries[0].logprob == pytest.approx(float(ref.max()), abs=1e-4)  # greedy: the chosen token is the argmax
    assert [a.logprob for a in entries[0].top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-5 and len(e.top_logprobs) == 3 for e in entries)
    # the entries cover the content tokens, byte for byte
    assert bytes(b for e in entries for b in e.bytes).decode(errors="replace").strip() == r.choices[0].message.content
    streamed = list(client.chat.completions.create(**kw, stream=True))
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in entries]
    plain = client.chat.completions.create(model=NAME, messages=USER, max_tokens=4)
    assert plain.choices[0].logprobs is None


@needs_serve
def test_text_completions(real):
    server, engine, model, tok = real
    client = client_for(server)
    prompt = "Anna Berg was born in"
    ids = tok.encode(prompt)
    want = generate(model, [ids], max_new_tokens=8, stop_ids=(tok.eot_id, tok.token_id(END)))[0]
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    assert r.object == "text_completion" and r.choices[0].text == tok.decode(want, skip_special=True)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want))
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] == pytest.approx(float(first_logprobs(model, ids).max()), abs=1e-4)
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    # streaming gives the same text; token ids work as the prompt; the default budget is 16 tokens
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [r.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == len(want)
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    assert client.completions.create(model=NAME, prompt="", temperature=0).usage.completion_tokens <= 16
    two = client.completions.create(model=NAME, prompt=prompt, max_tokens=5, n=2, temperature=1, seed=3)
    assert [c.index for c in two.choices] == [0, 1]

    def bad(**kw):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**({"model": NAME, "prompt": prompt} | kw))
        return e.value.body

    assert bad(echo=True)["param"] == "echo" and bad(suffix="x")["param"] == "suffix"
    assert bad(prompt=["a", "b"])["param"] == "prompt" and bad(prompt=[10**6])["param"] == "prompt"
    assert bad(max_tokens=5000)["code"] == "context_length_exceeded" and bad(logprobs=6)["param"] == "logprobs"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="davinci-002", prompt=prompt)
    assert wait_until(lambda: engine.active == 0)
