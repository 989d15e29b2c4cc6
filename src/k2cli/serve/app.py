"""The OpenAI-compatible HTTP app (FastAPI): /v1/models, /v1/chat/completions, /v1/completions, /health,
and the web chat at / (with /k2/tools for it, when a tool world is given).

    create_app(engine, tokenizer, model_name, aliases=(), api_key=None, default_max_tokens=512,
               max_waiting=1024, max_body_bytes=4 MiB, body_timeout=30.0, tools=None)

Test hook: `engine` is anything with `submit(prompt_ids, SamplingParams, n, sink) -> request`,
`cancel(request, choice=None)`, `active`, `context` and `max_batch` (see `serve.engine.Engine`):
tests pass a `serve.testing.ScriptedEngine` to drive the response assembly (tool calls above all)
deterministically without a model, and a real `Engine` everywhere else.

A request's life, and what each step defends against:
  1. `authorize` (constant-time key compare) before anything is read;
  2. `read_body`: a declared Content-Length above `max_body_bytes` is refused (413) before a byte of
     the body is read; a chunked body is counted as it arrives and cut off at the limit; the whole
     body must arrive within `body_timeout` (408, a slow-loris body). Both close the connection.
  3. `prepare`, in a small thread pool, never on the event loop: JSON parsing, validation, chat
     rendering and tokenisation of a large request take milliseconds to seconds, and on the loop
     they would stall every other client. Anything wrong with the input is a 400 (invalid UTF-8, a
     lone surrogate, NaN, nesting deeper than Python's recursion limit, wrong types), never a 500.
     A conversation whose text alone cannot fit the context is refused before it is tokenised
     (`_too_long_to_tokenize`), so the cost of a refused request does not grow with its size.
  4. the engine generates; tokens come from the engine thread through `sink`, which hands them to
     the request's asyncio queue with `call_soon_threadsafe`.
A streaming client that disconnects cancels its generator (Starlette cancels the response task),
whose `finally` cancels the engine request: its rows leave the batch at the next step. A
non-streaming client that disconnects is noticed by a watcher on `http.disconnect`, with the same
effect; one that leaves while its body is being read is dropped quietly (no traceback in the log).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from k2cli.data.chat import CALLS_BEGIN, END
from k2cli.data.tokenizer import EOT
from k2cli.errors import K2Error
from k2cli.serve import page, schemas
from k2cli.serve.engine import SamplingParams
from k2cli.serve.schemas import APIError
from k2cli.serve.tools import execute, tool_schemas
from k2cli.serve.turns import Prompt, TextDecoder, Turn, TurnDecoder, build_prompt, token_bytes

MAX_BODY_BYTES = 4 << 20  # 4 MiB: far more text than any k2 model's context holds
BODY_TIMEOUT_S = 30.0
PREPARE_THREADS = 2


def create_app(engine, tokenizer, model_name: str, aliases=(), api_key: str | None = None,
               default_max_tokens: int = 512, max_waiting: int = 1024, max_body_bytes: int = MAX_BODY_BYTES,
               body_timeout: float = BODY_TIMEOUT_S, tools=None) -> FastAPI:
    app = FastAPI(title="k2 serve", description="An OpenAI-compatible chat-completions server for a k2 model artifact.")
    app.state.engine = engine
    names = {model_name, *aliases}
    created = int(time.time())
    pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="k2-prepare")
    # the longest text one token can stand for: a conversation of more characters than context x this
    # cannot fit the context, whatever its tokenisation (each character is at least one byte)
    token_chars = max(len(tokenizer.decode([i]).encode()) for i in range(tokenizer.vocab_size))

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {"Retry-After": "1"} if e.status == 429 else None
        if e.status in (408, 413):  # the rest of the body is still on the wire: do not read it, hang up
            headers = {"Connection": "close"}
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request, e):
        return Response(status_code=499)  # the client left while sending: nobody reads this, nothing to log

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").body(), status_code=500)

    def authorize(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.", code="missing_api_key")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise APIError(400, "Content-Length is not a number", code="invalid_request")
            if int(declared) > max_body_bytes:
                raise _too_large(int(declared))

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    raise _too_large(size, so_far=True)
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {body_timeout:g} s", code="request_timeout")

    def _too_large(size: int, so_far: bool = False) -> APIError:
        return APIError(413, f"the request body is {'over ' if so_far else ''}{size} bytes; this server accepts at most "
                             f"{max_body_bytes} (k2 serve --max-body-mb)", code="request_too_large")

    async def off_loop(fn, *args):
        """Run fn in the prepare pool; the event loop goes on serving other clients meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        """The web chat (serve/page.py): it streams from this server's own /v1/chat/completions."""
        return HTMLResponse(page.HTML)

    @app.get("/k2/tools")
    async def list_tools(request: Request):
        """The tool world's schemas (`k2 serve --tools DATASET_REF`), for the web chat to declare."""
        authorize(request)
        if not tools:
            raise APIError(404, "this server has no tools (start it with --tools DATASET_REF)", code="no_tools")
        return {"tools": tool_schemas(tools)}

    @app.post("/k2/tools/call")
    async def call_tool(request: Request):
        """Run one tool call: {"name", "arguments"} -> {"content": the tool message's text}."""
        authorize(request)
        if not tools:
            raise APIError(404, "this server has no tools (start it with --tools DATASET_REF)", code="no_tools")
        body = parse_json(await read_body(request))
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise APIError(400, 'send {"name": TOOL, "arguments": {...} or a JSON string}', param="name", code="invalid_value")
        return {"content": await off_loop(execute, tools, body["name"], body.get("arguments", {}))}

    @app.get("/health")
    async def health():
        """Liveness and load (no key needed): requests in flight and, for the real engine, its counters."""
        return {"status": "ok", "model": model_name, "active": engine.active,
                "waiting": getattr(engine, "waiting", 0), "stats": dict(getattr(engine, "stats", {}))}

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [schemas.model_card(model_name, created)]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        authorize(request)
        if name not in names:
            raise _unknown_model(name)
        return schemas.model_card(model_name, created)

    def _unknown_model(name: str) -> APIError:
        return APIError(404, f"The model `{name}` does not exist. This server serves `{model_name}`.",
                        param="model", code="model_not_found")

    def _context_error(ctx: int, what: str) -> APIError:
        return APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested {what}. "
                             "Please reduce the length of the messages or completion.",
                        param="messages", code="context_length_exceeded")

    def check_size(req, chars: int) -> int:
        n = req.n or 1
        if n > engine.max_batch:
            raise APIError(400, f"n={n} is more than this server's batch of {engine.max_batch} rows", param="n", code="invalid_value")
        if chars > engine.context * token_chars:
            raise _context_error(engine.context, f"{chars} characters of prompt, more than {engine.context} tokens can hold")
        return n

    def job_for(req, prompt: Prompt, n: int, logprobs: int | None, default_max: int) -> "_Job":
        """The engine's parameters for a validated request, once its prompt is known to fit."""
        P, ctx = len(prompt.ids), engine.context
        chat = isinstance(req, schemas.ChatCompletionRequest)
        asked = req.max_completion_tokens or req.max_tokens if chat else req.max_tokens
        if P >= ctx or (asked and P + asked > ctx):
            raise _context_error(ctx, f"{P + (asked or 0)} tokens ({P} in the {'messages' if chat else 'prompt'}, "
                                      f"{asked or 0} in the completion)")
        params = SamplingParams(max_tokens=asked or min(default_max, ctx - P),
                                temperature=1.0 if req.temperature is None else req.temperature,
                                top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop_ids=prompt.stop_ids,
                                logprobs=logprobs)
        return _Job(req, prompt, params, n)

    def prepare_chat(raw: bytes) -> "_Job":
        """Body bytes -> a validated chat request and its prompt (runs in the pool; raises APIError)."""
        req = schemas.parse_request(parse_json(raw))
        if req.model not in names:
            raise _unknown_model(req.model)
        n = check_size(req, req.text_chars())
        try:
            prompt = build_prompt(tokenizer, req.dump_messages(), req.dump_tools(), req.dump_tool_choice())
        except K2Error as e:
            raise APIError(400, e.line(), param="messages")
        except RecursionError:
            raise APIError(400, "the request is nested too deeply", code="invalid_value")
        return job_for(req, prompt, n, req.logprob_count(), default_max_tokens)

    def prepare_text(raw: bytes) -> "_Job":
        """Body bytes -> a validated completions request and its prompt ids (the pool; raises APIError)."""
        req = schemas.parse_completion_request(parse_json(raw))
        if req.model not in names:
            raise _unknown_model(req.model)
        text = req.prompt_text()
        n = check_size(req, len(text) if isinstance(text, str) else 0)
        if isinstance(text, str):
            ids = tokenizer.encode(text) if text else [tokenizer.eot_id]  # "": a fresh document
        else:
            bad = [i for i in text if not 0 <= i < tokenizer.vocab_size]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                               param="prompt", code="invalid_value")
            ids = list(text)
        stop_ids = (tokenizer.eot_id, tokenizer.token_id(END))
        return job_for(req, Prompt(ids, "", False, stop_ids), n, req.logprobs, 16)

    async def generate(request: Request, job: "_Job", shape: "_Shape"):
        """Submit a prepared job to the engine; the response (a stream, or the whole body at the end)."""
        req, P, n = job.req, len(job.prompt.ids), job.n
        if getattr(engine, "waiting", 0) >= max_waiting:  # back-pressure: clients retry 429 after Retry-After
            raise APIError(429, f"the server is busy ({max_waiting} requests are waiting); retry shortly",
                           "rate_limit_error", code="server_busy")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        handle = engine.submit(job.prompt.ids, job.params, n, sink=lambda events: loop.call_soon_threadsafe(queue.put_nowait, events))
        choices = [_Choice(shape.decoder(req.stop_list(), job.prompt), tokenizer, job.params.logprobs) for _ in range(n)]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(engine, handle, queue, choices, shape, P, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        collect = asyncio.ensure_future(_collect(engine, handle, queue, choices))
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({collect, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            engine.cancel(handle)  # the client left: free its rows now (a no-op once every choice finished)
            watcher.cancel()
            gone = not collect.done()
            if gone:
                collect.cancel()
        if gone:
            return Response(status_code=499)  # nobody is there to read it (nginx's "client closed request")
        return JSONResponse(shape.body(collect.result(), choices, schemas.usage(P, sum(len(c.d.ids) for c in choices))))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        job = await off_loop(prepare_chat, await read_body(request))
        return await generate(request, job, _ChatShape(tokenizer, job.req.model))

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        job = await off_loop(prepare_text, await read_body(request))
        return await generate(request, job, _TextShape(tokenizer, job.req.model))

    return app


@dataclass
class _Job:
    """A validated request, ready for the engine."""

    req: object  # schemas.ChatCompletionRequest
    prompt: Prompt
    params: SamplingParams
    n: int


_LONE_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]", re.I)


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes):
    """Request bytes -> a JSON value; anything that is not strict JSON of valid Unicode is a 400."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)  # strict UTF-8: no raw surrogates
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise APIError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json")
    except RecursionError:
        raise APIError(400, "We could not parse the JSON body of your request: it is nested too deeply", code="invalid_json")
    if _LONE_SURROGATE_ESCAPE.search(raw):  # an escaped surrogate: fine in a pair, not alone
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the request contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                                "which is not Unicode text", code="invalid_json")
        except RecursionError:
            raise APIError(400, "the request is nested too deeply", code="invalid_json")
    return body


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body is read: the next ASGI message can only be that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


_ENDS_CONTENT = {END, EOT, CALLS_BEGIN}


class _Choice:
    """One choice in flight: its decoder, and, when logprobs were asked for, the entries
    (token, bytes, logprob, alternatives) of the tokens that are content (not special, not after the
    end of the content or a stop string), with how many were already sent."""

    def __init__(self, decoder, tokenizer, logprobs: int | None):
        self.d, self.tok, self.want = decoder, tokenizer, logprobs is not None
        self.entries: list = []
        self.sent = 0
        self.offset = 0  # characters of text the sent entries cover (the legacy text_offset)
        self.pending = None  # the engine's ("logprob", ...) value for the token that comes next
        self.closed = False  # a special token or a stop string ended the counted part

    def token(self, token: int) -> None:
        if not self.want:
            return
        pending, self.pending = self.pending, None
        piece = self.tok.decode([token])
        self.closed |= self.d.stopped or piece in (*self.tok.end_of_turn, *_ENDS_CONTENT)
        if self.closed or pending is None or piece in self.tok.specials:  # other special tokens show as nothing
            return
        lp, top = pending
        self.entries.append((self.tok.decode([token]), token_bytes(self.tok, token), lp,
                             [(self.tok.decode([t]), token_bytes(self.tok, t), alp) for t, alp in top]))

    def take(self) -> tuple[list, int]:
        """Entries not sent yet, and the text offset of the first."""
        new, start = self.entries[self.sent :], self.offset
        self.sent = len(self.entries)
        self.offset += sum(len(e[0]) for e in new)
        return new, start


def _events_for(events, choices, engine, handle):
    """Feed engine events to the choices; yields (choice, content delta, finished reason or None)."""
    for kind, i, value in events:
        c = choices[i]
        if kind == "error":
            raise APIError(500, f"generation failed: {value}", "server_error")
        if kind == "logprob":
            c.pending = value
        elif kind == "token":
            c.token(value)
            delta = c.d.feed(value)
            if c.d.stopped:  # a stop string matched: this choice is over, whatever the engine does next
                engine.cancel(handle, i)
                yield i, delta, "stop"
            elif delta or c.entries[c.sent :]:
                yield i, delta, None
        elif kind == "done" and not c.d.stopped:
            yield i, "", value


async def _collect(engine, handle, queue, choices) -> list:
    turns: list = [None] * len(choices)
    while any(t is None for t in turns):
        for i, _, reason in _events_for(await queue.get(), choices, engine, handle):
            if reason is not None and turns[i] is None:
                turns[i] = choices[i].d.finish(reason)
    return turns


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


class _Shape:
    """What differs between chat and text completions: the decoder, the chunks, the final body."""

    def __init__(self, tokenizer, model: str):
        self.tok, self.model = tokenizer, model
        self.cid, self.created = self.id_prefix + uuid.uuid4().hex[:24], int(time.time())


class _ChatShape(_Shape):
    id_prefix = "chatcmpl-"

    def decoder(self, stop, prompt: Prompt):
        return TurnDecoder(self.tok, stop, prompt.prefix, prompt.allow_tools)

    def _chunk(self, i, delta=None, finish=None, logprobs=None, usage="absent"):
        extra = {} if usage == "absent" else {"usage_": usage}
        return schemas.chunk(self.cid, self.model, self.created, i, delta, finish, logprobs=logprobs, **extra)

    def _lp(self, c: _Choice):
        new, _ = c.take()
        return schemas.chat_logprobs(new) if c.want and new else None

    def opening(self, i, usage):
        return [self._chunk(i, {"role": "assistant", "content": ""}, usage=usage)]

    def delta(self, i, c: _Choice, text: str, usage):
        return self._chunk(i, {"content": text} if text else {}, logprobs=self._lp(c), usage=usage)

    def closing(self, i, c: _Choice, turn, usage):
        out = []
        if turn.tool_calls:
            out.append(self._chunk(i, {"tool_calls": schemas.tool_call_deltas(turn.tool_calls)}, usage=usage))
        out.append(self._chunk(i, {}, turn.finish_reason, logprobs=self._lp(c), usage=usage))
        return out

    def usage_chunk(self, usage):
        return schemas.chunk(self.cid, self.model, self.created, None, usage_=usage)

    def body(self, turns, choices, usage):
        lps = [schemas.chat_logprobs(c.entries) for c in choices] if choices[0].want else None
        return schemas.completion(self.cid, self.model, turns, usage, lps)


class _TextShape(_Shape):
    id_prefix = "cmpl-"

    def decoder(self, stop, prompt: Prompt):
        return TextDecoder(self.tok, stop)

    def _chunk(self, i, c: _Choice, text: str, finish, usage):
        new, offset = c.take()
        lp = schemas.text_logprobs(new, offset) if c.want else None
        body = schemas.text_completion(self.cid, self.model, [Turn(text, [], finish)], None, [lp], self.created)
        body["choices"][0]["index"] = i
        if usage != "absent":
            body["usage"] = usage
        return body

    def opening(self, i, usage):
        return []

    def delta(self, i, c: _Choice, text: str, usage):
        return self._chunk(i, c, text, None, usage)

    def closing(self, i, c: _Choice, turn, usage):
        return [self._chunk(i, c, "", turn.finish_reason, usage)]

    def usage_chunk(self, usage):
        return schemas.text_completion(self.cid, self.model, [], usage, None, self.created)

    def body(self, turns, choices, usage):
        lps = [schemas.text_logprobs(c.entries) for c in choices] if choices[0].want else None
        return schemas.text_completion(self.cid, self.model, turns, usage, lps, self.created)


async def _stream(engine, handle, queue, choices, shape, prompt_tokens, include_usage):
    usage = None if include_usage else "absent"  # with include_usage, every chunk carries "usage": null
    finished = [False] * len(choices)
    try:
        for i in range(len(choices)):
            for obj in shape.opening(i, usage):
                yield _sse(obj)
        while not all(finished):
            events = await queue.get()
            try:
                out = list(_events_for(events, choices, engine, handle))
            except APIError as e:
                yield _sse(e.body())
                break
            for i, delta, reason in out:
                if finished[i]:
                    continue
                c = choices[i]
                if delta or (reason is None and c.entries[c.sent :]):
                    yield _sse(shape.delta(i, c, delta, usage))
                if reason is not None:
                    finished[i] = True
                    rest = c.d.flush()
                    if rest:
                        yield _sse(shape.delta(i, c, rest, usage))
                    for obj in shape.closing(i, c, c.d.finish(reason), usage):
                        yield _sse(obj)
        if include_usage:
            yield _sse(shape.usage_chunk(schemas.usage(prompt_tokens, sum(len(c.d.ids) for c in choices))))
        yield b"data: [DONE]\n\n"
    finally:
        engine.cancel(handle)  # the client left mid-stream (or we are done): free the rows now
