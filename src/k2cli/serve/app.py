"""The OpenAI-compatible HTTP app (FastAPI): /v1/models, /v1/chat/completions, /health.

    create_app(engine, tokenizer, model_name, aliases=(), api_key=None, default_max_tokens=512)

Test hook: `engine` is anything with `submit(prompt_ids, SamplingParams, n, sink) -> request`,
`cancel(request, choice=None)`, `active`, `context` and `max_batch` (see `serve.engine.Engine`):
tests pass a `serve.testing.ScriptedEngine` to drive the response assembly (tool calls above all)
deterministically without a model, and a real `Engine` everywhere else.

Each request runs on the event loop; tokens come from the engine thread through `sink`, which
hands them to the request's asyncio queue with `call_soon_threadsafe`. A streaming client that
disconnects cancels its generator (Starlette cancels the response task), whose `finally` cancels
the engine request: its rows leave the batch at the next step. A non-streaming client that
disconnects is noticed by a watcher on `http.disconnect`, with the same effect.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2cli.errors import K2Error
from k2cli.serve import schemas
from k2cli.serve.engine import SamplingParams
from k2cli.serve.schemas import APIError
from k2cli.serve.turns import TurnDecoder, build_prompt


def create_app(engine, tokenizer, model_name: str, aliases=(), api_key: str | None = None,
               default_max_tokens: int = 512, max_waiting: int = 1024) -> FastAPI:
    app = FastAPI(title="k2 serve", description="An OpenAI-compatible chat-completions server for a k2 model artifact.")
    app.state.engine = engine
    names = {model_name, *aliases}
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json")
        req = schemas.parse_request(body)
        if req.model not in names:
            raise _unknown_model(req.model)
        try:
            prompt = build_prompt(tokenizer, req.dump_messages(), req.dump_tools(), req.dump_tool_choice())
        except K2Error as e:
            raise APIError(400, e.line(), param="messages")
        n = req.n or 1
        if n > engine.max_batch:
            raise APIError(400, f"n={n} is more than this server's batch of {engine.max_batch} rows", param="n", code="invalid_value")
        P, ctx = len(prompt.ids), engine.context
        asked = req.max_completion_tokens or req.max_tokens
        if P >= ctx or (asked and P + asked > ctx):
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{P + (asked or 0)} tokens ({P} in the messages, {asked or 0} in the completion). "
                                "Please reduce the length of the messages or completion.",
                           param="messages", code="context_length_exceeded")
        params = SamplingParams(max_tokens=asked or min(default_max_tokens, ctx - P),
                                temperature=1.0 if req.temperature is None else req.temperature,
                                top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop_ids=prompt.stop_ids)
        if getattr(engine, "waiting", 0) >= max_waiting:  # back-pressure: clients retry 429 after Retry-After
            raise APIError(429, f"the server is busy ({max_waiting} requests are waiting); retry shortly",
                           "rate_limit_error", code="server_busy")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        handle = engine.submit(prompt.ids, params, n, sink=lambda events: loop.call_soon_threadsafe(queue.put_nowait, events))
        decoders = [TurnDecoder(tokenizer, req.stop_list(), prompt.prefix, prompt.allow_tools) for _ in range(n)]
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
