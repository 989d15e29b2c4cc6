"""Request validation and response bodies of the OpenAI chat-completions protocol (the subset k2 serves).

Requests are validated with pydantic (the `serve` extra brings it with FastAPI); a violation becomes
an OpenAI error body `{"error": {"message", "type", "param", "code"}}` with status 400, never
FastAPI's 422. Unknown fields are ignored, as OpenAI-compatible servers commonly do; fields that
would change the answer and that k2 cannot honour (logprobs, non-text content, response_format
other than text) are refused with a message instead of silently ignored.
"""

from __future__ import annotations

import time
import uuid
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


def parse_request(body: Any) -> ChatCompletionRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise APIError(400, f"invalid request: '{loc}': {first['msg']}{more}", param=loc or None,
                       code="missing_required_parameter" if first["type"] == "missing" else "invalid_value")
    if req.logprobs:
        raise APIError(400, "logprobs are not supported by k2 serve", param="logprobs", code="unsupported_parameter")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format",
                       code="unsupported_parameter")
    return req


# ----------------------------------------------------------------------------- responses


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "k2"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, turns: list, usage_: dict) -> dict:
    """The non-streaming body: one choice per turn (serve.turns.Turn)."""
    choices = []
    for i, t in enumerate(turns):
        choice = {"index": i, "message": t.message(), "logprobs": None, "finish_reason": t.finish_reason}
        if t.errors:
            choice["k2_tool_call_errors"] = t.errors  # malformed calls the model wrote (not OpenAI; clients ignore it)
        choices.append(choice)
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage_}


def chunk(cid: str, model: str, created: int, index: int | None, delta: dict | None = None,
          finish_reason: str | None = None, usage_: dict | None = None) -> dict:
    """One `chat.completion.chunk`; index None gives the usage-only chunk that ends a stream."""
    choices = [] if index is None else [{"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices}
    if usage_ is not None or index is None:
        body["usage"] = usage_
    return body


def tool_call_deltas(calls: list[dict]) -> list[dict]:
    return [{"index": i, "id": c["id"], "type": "function", "function": dict(c["function"])} for i, c in enumerate(calls)]
