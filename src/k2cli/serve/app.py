"""The OpenAI-compatible HTTP app (FastAPI): /v1/models, /v1/chat/completions, /health.

    create_app(engine, tokenizer, model_name, aliases=(), api_key=None, default_max_tokens=512,
               max_waiting=1024, max_body_bytes=4 MiB, body_timeout=30.0)

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from k2cli.errors import K2Error
from k2cli.serve import schemas
from k2cli.serve.engine import SamplingParams
from k2cli.serve.schemas import APIError
from k2cli.serve.turns import Prompt, TurnDecoder, build_prompt

MAX_BODY_BYTES = 4 << 20  # 4 MiB: far more text than any k2 model's context holds
BODY_TIMEOUT_S = 30.0
PREPARE_THREADS = 2


def create_app(engine, tokenizer, model_name: str, aliases=(), api_key: str | None = None,
               default_max_tokens: int = 512, max_waiting: int = 1024, max_body_bytes: int = MAX_BODY_BYTES,
               body_timeout: float = BODY_TIMEOUT_S) -> FastAPI:
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

    def prepare_chat(raw: bytes) -> "_Job":
        """Body bytes -> a validated request and its prompt (runs in the pool; raises APIError)."""
        req = schemas.parse_request(parse_json(raw))
        if req.model not in names:
            raise _unknown_model(req.model)
        n = req.n or 1
        if n > engine.max_batch:
            raise APIError(400, f"n={n} is more than this server's batch of {engine.max_batch} rows", param="n", code="invalid_value")
        ctx = engine.context
        chars = req.text_chars()
        if chars > ctx * token_chars:
            raise _context_error(ctx, f"{chars} characters of messages, more than {ctx} tokens can hold")
        try:
            prompt = build_prompt(tokenizer, req.dump_messages(), req.dump_tools(), req.dump_tool_choice())
        except K2Error as e:
            raise APIError(400, e.line(), param="messages")
        except RecursionError:
            raise APIError(400, "the request is nested too deeply", code="invalid_value")
        P = len(prompt.ids)
        asked = req.max_completion_tokens or req.max_tokens
        if P >= ctx or (asked and P + asked > ctx):
            raise _context_error(ctx, f"{P + (asked or 0)} tokens ({P} in the messages, {asked or 0} in the completion)")
        params = SamplingParams(max_tokens=asked or min(default_max_tokens, ctx - P),
                                temperature=1.0 if req.temperature is None else req.temperature,
                                top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop_ids=prompt.stop_ids)
        return _Job(req, prompt, params, n)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        job = await off_loop(prepare_chat, await read_body(request))
        req, P, n = job.req, len(job.prompt.ids), job.n
        if getattr(engine, "waiting", 0) >= max_waiting:  # back-pressure: clients retry 429 after Retry-After
            raise APIError(429, f"the server is busy ({max_waiting} requests are waiting); retry shortly",
                           "rate_limit_error", code="server_busy")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        handle = engine.submit(job.prompt.ids, job.params, n, sink=lambda events: loop.call_soon_threadsafe(queue.put_nowait, events))
        decoders = [TurnDecoder(tokenizer, req.stop_list(), job.prompt.prefix, job.prompt.allow_tools) for _ in range(n)]
        cid = schemas.completion_id()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(engine, handle, queue, decoders, cid, req.model, P, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        collect = asyncio.ensure_future(_collect(engine, handle, queue, decoders))
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
        turns = collect.result()
        completion_tokens = sum(len(d.ids) for d in decoders)
        return JSONResponse(schemas.completion(cid, req.model, turns, schemas.usage(P, completion_tokens)))

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


def _events_for(events, decoders, engine, handle):
    """Feed engine events to the decoders; yields (choice, content delta, finished reason or None)."""
    for kind, choice, value in events:
        d = decoders[choice]
        if kind == "error":
            raise APIError(500, f"generation failed: {value}", "server_error")
        if kind == "token":
            delta = d.feed(value)
            if d.stopped:  # a stop string matched: this choice is over, whatever the engine does next
                engine.cancel(handle, choice)
                yield choice, delta, "stop"
            elif delta:
                yield choice, delta, None
        elif kind == "done" and not d.stopped:
            yield choice, "", value


async def _collect(engine, handle, queue, decoders) -> list:
    turns: list = [None] * len(decoders)
    while any(t is None for t in turns):
        for choice, _, reason in _events_for(await queue.get(), decoders, engine, handle):
            if reason is not None and turns[choice] is None:
                turns[choice] = decoders[choice].finish(reason)
    return turns


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


async def _stream(engine, handle, queue, decoders, cid, model, prompt_tokens, include_usage):
    created = int(time.time())
    finished = [False] * len(decoders)
    extra = {"usage_": None} if include_usage else {}
    try:
        for i in range(len(decoders)):
            yield _sse(schemas.chunk(cid, model, created, i, {"role": "assistant", "content": ""}, **extra))
        while not all(finished):
            events = await queue.get()
            try:
                out = list(_events_for(events, decoders, engine, handle))
            except APIError as e:
                yield _sse(e.body())
                break
            for choice, delta, reason in out:
                if finished[choice]:
                    continue
                if delta:
                    yield _sse(schemas.chunk(cid, model, created, choice, {"content": delta}, **extra))
                if reason is not None:
                    finished[choice] = True
                    d = decoders[choice]
                    rest = d.flush()
                    if rest:
                        yield _sse(schemas.chunk(cid, model, created, choice, {"content": rest}, **extra))
                    turn = d.finish(reason)
                    if turn.tool_calls:
                        yield _sse(schemas.chunk(cid, model, created, choice, {"tool_calls": schemas.tool_call_deltas(turn.tool_calls)}, **extra))
                    yield _sse(schemas.chunk(cid, model, created, choice, {}, turn.finish_reason, **extra))
        if include_usage:
            yield _sse(schemas.chunk(cid, model, created, None, usage_=schemas.usage(prompt_tokens, sum(len(d.ids) for d in decoders))))
        yield b"data: [DONE]\n\n"
    finally:
        engine.cancel(handle)  # the client left mid-stream (or we are done): free the rows now
