"""From OpenAI-shaped messages to prompt ids, and from generated ids back to an assistant turn.

Shared by the server and the terminal chat, so both speak exactly the model's chat format
(`k2cli.data.chat`: Kimi K2's template for models k2 trained, the tokenizer's own for imported ones):
the same rendering SFT trained on, the same parser RL scores with, the template's end-of-turn token as
the stop. A client's tool-call ids are renamed to K2's convention (as SFT data is), and a tool result
gets its call's function name (K2's template shows it).

    build_prompt(tokenizer, messages, tools, tool_choice) -> Prompt(ids, prefix, allow_tools)
    TurnDecoder(tokenizer, stop, prefix).feed(token) -> content text safe to show now
    TurnDecoder.finish(reason) -> Turn(content, tool_calls, finish_reason, errors)

tool_choice is carried out on the prompt, not by constraining the sampler:
    "auto"     the model decides (without tools declared, "auto" is "none": a model trained on
               tool-using conversations may start a call section anyway, and a call to a function
               the client never declared is one it cannot answer);
    "none"     `<|tool_calls_section_begin|>` becomes a stop token: the turn ends where a call would start;
    "required" the assistant turn is pre-filled with `<|tool_calls_section_begin|>`;
    {"type": "function", "function": {"name": X}}  pre-filled up to the call's arguments
               (`...<|tool_call_begin|>functions.X:<n><|tool_call_argument_begin|>`), n being the
               number of tool calls earlier in the conversation, as K2's ids count them.
Pre-filling forces a call to start; whether the model writes valid JSON arguments is up to it.
"required" and a named function need K2's tool-call tokens; with another template only "auto" and
"none" are carried out.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from k2cli.data.chat import (CALL_ARGS, CALL_BEGIN, CALLS_BEGIN, END, call_id, content_text, parse_turn, render,
                              template_call_ids, validate_conversation)
from k2cli.data.tokenizer import EOT, TiktokenTokenizer
from k2cli.errors import K2Error



def special_pattern(tokenizer) -> re.Pattern:
    """The tokenizer's special tokens as one regex (longest first), to strip them from shown content."""
    names = sorted((t for t in tokenizer.specials if t), key=len, reverse=True) or [END, EOT]
    return re.compile("|".join(map(re.escape, names)))


@dataclass
class Prompt:
    ids: list[int]
    prefix: str = ""  # text forced at the start of the assistant turn (already in ids)
    allow_tools: bool = True
    stop_ids: tuple[int, ...] = ()


def normalize_messages(messages: list[dict]) -> list[dict]:
    """OpenAI request messages -> the dicts `chat.render` takes (developer is a system message; a tool
    result gets its call's function name, which K2's template shows; call ids in K2's convention, as SFT
    data has them: `chat.template_call_ids`)."""
    out, names = [], {}
    for i, m in enumerate(messages):
        role = m.get("role")
        role = "system" if role == "developer" else role
        msg = {"role": role, "content": content_text(m.get("content"), f"message {i}")}
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = c.get("function") or {}
                if not c.get("id") or not fn.get("name"):
                    raise K2Error(f"message {i}: a tool call needs an id and function.name", "send the tool_calls the server returned")
                args = fn.get("arguments", "{}")
                calls.append({"id": c["id"], "type": "function", "function": {"name": fn["name"], "arguments": args}})
                names[c["id"]] = fn["name"]
            msg["tool_calls"] = calls
        if role == "tool":
            if not m.get("tool_call_id"):
                raise K2Error(f"message {i}: a tool message needs tool_call_id", "answer a tool call by its id")
            msg["tool_call_id"] = m["tool_call_id"]
            name = m.get("name") or names.get(m["tool_call_id"])
            if name:
                msg["name"] = name
        out.append(msg)
    return template_call_ids(out)[0]


def build_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None, tool_choice=None) -> Prompt:
    """Prompt ids for the next assistant turn; raises K2Error for a conversation k2 cannot render."""
    messages = normalize_messages(messages)
    validate_conversation(messages)
    if messages[-1]["role"] == "assistant":
        raise K2Error("the last message is the assistant's", "end the conversation with a user or tool message")
    tools = tools or None
    names = [t.get("function", {}).get("name") for t in tools or []]
    choice = tool_choice if tool_choice is not None else "auto"
    if choice == "auto" and not tools:
        choice = "none"
    if choice in ("required",) or isinstance(choice, dict):
        if not tools:
            raise K2Error(f"tool_choice {json.dumps(choice)} needs tools", "pass tools, or use tool_choice 'auto'")
    ids = render(tokenizer, messages, tools, add_generation_prompt=True).ids
    stop_ids = tokenizer.stop_ids  # the template's end-of-turn token(s), then end-of-sequence
    k2_calls = tokenizer.has_token(CALLS_BEGIN)  # tool choice is carried out with K2's tool-call markers
    if choice == "none":
        return Prompt(ids, "", False, stop_ids + ((tokenizer.token_id(CALLS_BEGIN),) if k2_calls else ()))
    if choice == "auto":
        return Prompt(ids, "", True, stop_ids)
    if not k2_calls:
        raise K2Error(f"tool_choice {json.dumps(choice)} needs K2's tool-call tokens, which this model's tokenizer does not have",
                      "use tool_choice 'auto' or 'none'")
    if choice == "required":
        prefix = CALLS_BEGIN
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise K2Error(f"tool_choice names function {name!r}, which is not among the tools", f"tools: {', '.join(map(str, names))}")
        n = sum(len(m.get("tool_calls") or []) for m in messages if m["role"] == "assistant")
        prefix = CALLS_BEGIN + CALL_BEGIN + call_id(name, n) + CALL_ARGS
    else:
        raise K2Error(f"unknown tool_choice {choice!r}", "use none, auto, required or {'type': 'function', 'function': {'name': ...}}")
    return Prompt(ids + encode_with_specials(tokenizer, prefix), prefix, True, stop_ids)


def encode_with_specials(tokenizer, text: str) -> list[int]:
    """Ids of text that contains special tokens: each special is its one id, the text between is
    BPE-encoded piece by piece, as `chat.render` does."""
    special = special_pattern(tokenizer)
    ids: list[int] = []
    for piece in re.split(f"({special.pattern})", text):
        if piece:
            ids += [tokenizer.token_id(piece)] if special.fullmatch(piece) else tokenizer.encode(piece)
    return ids


def settled(text: str, stop: list[str], final: bool) -> tuple[str, bool]:
    """(the part of decoded text that is safe to send, whether a stop string matched).

    Cut at the first stop string; unless final, hold back an incomplete UTF-8 character (decoded as
    U+FFFD) and a tail that could still grow into a stop string."""
    for s in stop:
        k = text.find(s)
        if k >= 0:
            return text[:k], True
    if not final:
        text = text.rstrip("\ufffd")
        hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        text = text[: len(text) - hold]
    return text, False


class TextDecoder:
    """A plain completion's tokens -> text deltas (`/v1/completions`): the text as decoded, special
    tokens dropped, whitespace kept; stop strings and incomplete characters held back as in TurnDecoder."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tok, self.stop = tokenizer, [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def _text(self, final: bool) -> str:
        text, stopped = settled(self.tok.decode(self.ids, skip_special=True), self.stop, final)
        self.stopped |= stopped
        return text

    def feed(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self._text(final=False)
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def flush(self) -> str:
        text = self._text(final=True)
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta

    def finish(self, reason: str) -> "Turn":
        return Turn(self._text(final=True), [], "stop" if self.stopped else reason)


_BYTE_OF: dict[str, int] = {}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for (a byte-level BPE piece may be part of one UTF-8 character)."""
    if not _BYTE_OF:  # GPT-2's byte <-> printable-character table, which byte-level BPE vocabularies use
        keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
        extra = [b for b in range(256) if b not in keep]
        _BYTE_OF.update({chr(b): b for b in keep} | {chr(256 + i): b for i, b in enumerate(extra)})
    if isinstance(tokenizer, TiktokenTokenizer):  # its ranks are bytes already
        return tokenizer.model.decode_single_token_bytes(token_id)
    piece = tokenizer.tok.id_to_token(token_id) or ""
    if piece and all(c in _BYTE_OF for c in piece) and piece not in tokenizer.specials:
        return bytes(_BYTE_OF[c] for c in piece)
    return piece.encode()


@dataclass
class Turn:
    content: str
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI shape: arguments as JSON strings
    finish_reason: str = "stop"  # stop | length | tool_calls
    errors: list[str] = field(default_factory=list)  # malformed tool calls, described

    def message(self) -> dict:
        m = {"role": "assistant", "content": self.content or (None if self.tool_calls else "")}
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        return m


class TurnDecoder:
    """Turns one choice's generated tokens into content deltas, then a finished Turn.

    Content is the text before any tool-call section and before `<|im_end|>`, with special tokens
    removed and outer whitespace stripped (as `parse_assistant` does). What `feed` returns is safe
    to stream: text that might still turn out to start a stop string, trailing whitespace and an
    incomplete UTF-8 character are held back until they are settled.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None, prefix: str = "", allow_tools: bool = True):
        self.tok = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.prefix = prefix
        self.allow_tools = allow_tools
        self.ids: list[int] = []
        self.sent = ""  # content already returned by feed()
        self.stopped = False  # a stop string matched: the caller should cancel this choice
        self.special = special_pattern(tokenizer)
        eos = tokenizer.config_token("eos_token") if hasattr(tokenizer, "config_token") else None
        self.ends = [t for t in (*tokenizer.end_of_turn, eos, EOT) if t]  # where the turn's text ends
        # where tool calls start: K2's section, else the <tool_call> blocks other templates use (best effort)
        self.calls_start = CALLS_BEGIN if tokenizer.has_token(CALLS_BEGIN) else "<tool_call>"

    def _raw(self) -> str:
        return self.prefix + self.tok.decode(self.ids)

    def _content(self, raw: str, final: bool) -> str:
        for end in self.ends:
            text = raw = raw.split(end, 1)[0]
        text = self.special.sub("", text.split(self.calls_start, 1)[0]).lstrip()
        text, stopped = settled(text, self.stop, final)
        self.stopped |= stopped
        return text.rstrip()

    def feed(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self._content(self._raw(), final=False)
        if not text.startswith(self.sent):  # cannot happen with the rules above; never send a contradiction
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def flush(self) -> str:
        """Content that was held back, once the choice has ended."""
        text = self._content(self._raw(), final=True)
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta

    def finish(self, reason: str) -> Turn:
        """reason: the engine's ("stop" | "length"), or "stop" after a stop string."""
        raw = self._raw()
        content = self._content(raw, final=True)
        parsed = parse_turn(self.tok, raw)
        if self.stopped or not self.allow_tools or not (parsed.tool_calls or parsed.errors):
            return Turn(content, [], "stop" if self.stopped else reason)
        if CALLS_BEGIN not in raw:  # a template's JSON calls (no K2 markers): the content is the text before them
            content = parsed.content
        calls = [{"id": c["id"], "type": "function",
                  "function": {"name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False)}}
                 for c in parsed.tool_calls]
        if reason == "length":
            return Turn(content, calls, "length", parsed.errors)
        return Turn(content, calls, "tool_calls" if calls else "stop", parsed.errors)
