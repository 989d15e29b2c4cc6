"""Request validation and response bodies of the OpenAI chat-completions and (legacy) completions
protocols (the subset k2 serves).

Requests are validated with pydantic (the `serve` extra brings it with FastAPI); a violation becomes
an OpenAI error body `{"error": {"message", "type", "param", "code"}}` with status 400, never
FastAPI's 422. Unknown fields are ignored, as OpenAI-compatible servers commonly do; fields that
would change the answer and that k2 cannot honour (non-text content, response_format other than
text, `echo` / `suffix` / `best_of` on completions) are refused with a message instead of silently
ignored.

Logprobs are the model's own (log_softmax of its logits, before temperature and top-p), as vLLM
reports them; for chat they cover the content tokens (up to the first special token).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An error the client caused (or a server problem), in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionCall(_Model):
    name: str
    arguments: str | dict = "{}"  # OpenAI sends a JSON string; a dict is accepted too


class ToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionDef(_Model):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Model):
    include_usage: bool = False


class ChatCompletionRequest(_Model):
    model: str
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=128)
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def dump_messages(self) -> list[dict]:
        return [m.model_dump(exclude_none=True) for m in self.messages]

    def dump_tools(self) -> list[dict] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def text_chars(self) -> int:
        """Characters of text the conversation carries (a lower bound on what its rendering holds)."""
        n = 0
        for m in self.messages:
            if isinstance(m.content, str):
                n += len(m.content)
            elif m.content:
                n += sum(len(p["text"]) for p in m.content if isinstance(p.get("text"), str))
            for c in m.tool_calls or []:
                n += len(c.function.arguments) if isinstance(c.function.arguments, str) else 0
        return n

    def dump_tool_choice(self):
        return self.tool_choice.model_dump() if isinstance(self.tool_choice, BaseModel) else self.tool_choice


    def logprob_count(self) -> int | None:
        """None: no logprobs; k: each token's logprob and its k most likely alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Model):
    """`/v1/completions`: one prompt (a string, a one-string list, or token ids) continued as text."""

    model: str
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=128)
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy API: the number of alternatives
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    _stop = field_validator("stop")(ChatCompletionRequest._stop.__func__)
    stop_list = ChatCompletionRequest.stop_list

    def prompt_text(self) -> str | list[int]:
        if not isinstance(self.prompt, str) and not self.prompt:
            raise APIError(400, "the prompt is an empty list", param="prompt", code="invalid_value")
        if isinstance(self.prompt, list) and all(isinstance(p, str) for p in self.prompt):
            if len(self.prompt) != 1:
                raise APIError(400, f"k2 serve continues one prompt per request; this one has {len(self.prompt)}",
                               param="prompt", code="unsupported_parameter")
            return self.prompt[0]
        return self.prompt


def _validate(cls, body: Any):
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise APIError(400, f"invalid request: '{loc}': {first['msg']}{more}", param=loc or None,
                       code="missing_required_parameter" if first["type"] == "missing" else "invalid_value")


def parse_completion_request(body: Any) -> CompletionRequest:
    req = _validate(CompletionRequest, body)
    for name, bad in (("echo", req.echo), ("suffix", req.suffix is not None), ("best_of", req.best_of not in (None, req.n or 1))):
        if bad:
            raise APIError(400, f"{name} is not supported by k2 serve", param=name, code="unsupported_parameter")
    return req


def parse_request(body: Any) -> ChatCompletionRequest:
    req = _validate(ChatCompletionRequest, body)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format",
                       code="unsupported_parameter")
    return req


# ----------------------------------------------------------------------------- responses



def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "k2"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, turns: list, usage_: dict, logprobs: list | None = None) -> dict:
    """The non-streaming body: one choice per turn (serve.turns.Turn); logprobs: per choice, or None."""
    choices = []
    for i, t in enumerate(turns):
        choice = {"index": i, "message": t.message(), "logprobs": logprobs[i] if logprobs else None,
                  "finish_reason": t.finish_reason}
        if t.errors:
            choice["k2_tool_call_errors"] = t.errors  # malformed calls the model wrote (not OpenAI; clients ignore it)
        choices.append(choice)
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage_}


def chunk(cid: str, model: str, created: int, index: int | None, delta: dict | None = None,
          finish_reason: str | None = None, usage_: dict | None = None, logprobs: dict | None = None) -> dict:
    """One `chat.completion.chunk`; index None gives the usage-only chunk that ends a stream."""
    choices = [] if index is None else [{"index": index, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish_reason}]
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices}
    if usage_ is not None or index is None:
        body["usage"] = usage_
    return body


def tool_call_deltas(calls: list[dict]) -> list[dict]:
    return [{"index": i, "id": c["id"], "type": "function", "function": dict(c["function"])} for i, c in enumerate(calls)]


def chat_logprobs(entries: list[tuple[str, bytes, float, list[tuple[str, bytes, float]]]]) -> dict:
    """Chat's `logprobs` of a choice (or of a chunk): entries (token, bytes, logprob, top alternatives)."""
    return {"content": [{"token": t, "logprob": lp, "bytes": list(b),
                         "top_logprobs": [{"token": a, "logprob": alp, "bytes": list(ab)} for a, ab, alp in top]}
                        for t, b, lp, top in entries], "refusal": None}


def text_logprobs(entries, offset: int = 0) -> dict:
    """The legacy completions' `logprobs`: parallel lists; text_offset counts characters from `offset`."""
    offsets = []
    for t, _, _, _ in entries:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": [t for t, *_ in entries], "token_logprobs": [lp for _, _, lp, _ in entries],
            "top_logprobs": [{a: alp for a, _, alp in top} for *_, top in entries], "text_offset": offsets}


def text_completion(cid: str, model: str, turns: list, usage_: dict, logprobs: list | None = None,
                    created: int | None = None) -> dict:
    """`/v1/completions`: one choice per turn; also each chunk of its stream (turn.content the delta)."""
    choices = [{"index": i, "text": t.content, "logprobs": logprobs[i] if logprobs else None, "finish_reason": t.finish_reason}
               for i, t in enumerate(turns)]
    body = {"id": cid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "system_fingerprint": None, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body
