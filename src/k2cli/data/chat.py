"""The chat format: rendering conversations with tools to token ids + loss mask, the same
format as a Jinja chat template (so `transformers`' `apply_chat_template` gives the very same
ids), and a tool-call parser that never crashes.

A conversation is OpenAI/TRL-shaped: `messages` (system / user / assistant / tool) plus
`tools` (OpenAI function schemas). The layout follows Kimi K2's template:

    <|im_system|>tool_declare<|im_middle|>[...tool schemas as JSON...]<|im_end|>     (when tools)
    <|im_system|>system<|im_middle|>You are ...<|im_end|>
    <|im_user|>user<|im_middle|>Book a table for two<|im_end|>
    <|im_assistant|>assistant<|im_middle|>Let me look.<|tool_calls_section_begin|>
        <|tool_call_begin|>functions.find_restaurant:0<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|>
    <|tool_calls_section_end|><|im_end|>
    <|im_tool|>tool<|im_middle|>## Return of functions.find_restaurant:0
    {"name": "Fjord"}<|im_end|>
    <|im_assistant|>assistant<|im_middle|>...

Training (SFT) puts loss on what the assistant writes: its content, its tool-call section and
its closing <|im_end|>, never on headers, users, tools or the system prompt.

Text between special tokens is tokenised piece by piece; a fast tokenizer splits special
tokens out before BPE in exactly the same way, which is what makes the two paths agree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from k2cli.errors import K2Error

ROLE_TOKEN = {"system": "<|im_system|>", "user": "<|im_user|>", "assistant": "<|im_assistant|>", "tool": "<|im_tool|>"}
MIDDLE, END = "<|im_middle|>", "<|im_end|>"
CALLS_BEGIN, CALLS_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, CALL_ARGS, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"

CHAT_TEMPLATE = (
    "{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}<|im_system|>system<|im_middle|>"
    "{%- elif m['role'] == 'user' -%}<|im_user|>user<|im_middle|>"
    "{%- elif m['role'] == 'assistant' -%}<|im_assistant|>assistant<|im_middle|>"
    "{%- elif m['role'] == 'tool' -%}<|im_tool|>tool<|im_middle|>## Return of {{ m['tool_call_id'] }}{{ '\\n' }}"
    "{%- endif -%}"
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- endif -%}"
    "{%- if m['role'] == 'assistant' and m.get('tool_calls') -%}<|tool_calls_section_begin|>"
    "{%- for c in m['tool_calls'] -%}<|tool_call_begin|>{{ c['id'] }}<|tool_call_argument_begin|>"
    "{%- if c['function']['arguments'] is string -%}{{ c['function']['arguments'] }}"
    "{%- else -%}{{ c['function']['arguments'] | tojson }}{%- endif -%}<|tool_call_end|>"
    "{%- endfor -%}<|tool_calls_section_end|>"
    "{%- endif -%}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)


def call_id(name: str, index: int) -> str:
    """K2's tool-call id: functions.<name>:<index in the conversation>."""
    return f"functions.{name}:{index}"


def _arguments_text(arguments) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def validate_conversation(messages: list[dict]) -> None:
    """Roles in an order a chat model can learn from; raises K2Error naming the problem."""
    if not messages:
        raise K2Error("empty conversation", "give at least one message")
    seen_non_system = False
    pending_calls: set[str] = set()
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLE_TOKEN:
            raise K2Error(f"message {i} has unknown role {role!r}", "use system, user, assistant or tool")
        if role == "system" and seen_non_system:
            raise K2Error(f"message {i}: a system message after the conversation started", "put system messages first")
        if role != "system":
            seen_non_system = True
        if role == "tool":
            cid = m.get("tool_call_id")
            if cid not in pending_calls:
                raise K2Error(f"message {i}: a tool result for {cid!r}, which no earlier assistant message called",
                              "tool messages must answer the preceding assistant's tool_calls")
            pending_calls.discard(cid)
        elif role == "assistant":
            pending_calls = {c["id"] for c in m.get("tool_calls") or []}
        elif pending_calls and role == "user":
            raise K2Error(f"message {i}: a user message while tool calls {sorted(pending_calls)} are unanswered",
                          "answer every tool call with a tool message first")


@dataclass
class Rendered:
    ids: list[int]
    mask: list[bool]  # True where the token is the assistant's (trained on)


def render(tokenizer, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False) -> Rendered:
    """Token ids and assistant mask of a conversation, identical to the Jinja CHAT_TEMPLATE."""
    ids: list[int] = []
    mask: list[bool] = []

    def special(token: str, trained: bool = False):
        ids.append(tokenizer.token_id(token))
        mask.append(trained)

    def text(s: str, trained: bool = False):
        if s:
            piece = tokenizer.encode(s)
            ids.extend(piece)
            mask.extend([trained] * len(piece))

    if tools:
        special("<|im_system|>")
        text("tool_declare")
        special(MIDDLE)
        text(json.dumps(tools, ensure_ascii=False))
        special(END)
    for m in messages:
        role = m["role"]
        own = role == "assistant"
        special(ROLE_TOKEN[role])
        text(role)
        special(MIDDLE)
        if role == "tool":
            text(f"## Return of {m['tool_call_id']}\n")
        if isinstance(m.get("content"), str):
            text(m["content"], own)
        if own and m.get("tool_calls"):
            special(CALLS_BEGIN, True)
            for c in m["tool_calls"]:
                special(CALL_BEGIN, True)
                text(c["id"], True)
                special(CALL_ARGS, True)
                text(_arguments_text(c["function"]["arguments"]), True)
                special(CALL_END, True)
            special(CALLS_END, True)
        special(END, own)
    if add_generation_prompt:
        special(ROLE_TOKEN["assistant"])
        text("assistant")
        special(MIDDLE)
    return Rendered(ids, mask)


def render_text(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False) -> str:
    """The same rendering as a string (for display and for prompts to text backends)."""
    out = []
    if tools:
        out.append(f"<|im_system|>tool_declare{MIDDLE}{json.dumps(tools, ensure_ascii=False)}{END}")
    for m in messages:
        role = m["role"]
        out.append(f"{ROLE_TOKEN[role]}{role}{MIDDLE}")
        if role == "tool":
            out.append(f"## Return of {m['tool_call_id']}\n")
        if isinstance(m.get("content"), str):
            out.append(m["content"])
        if role == "assistant" and m.get("tool_calls"):
            out.append(CALLS_BEGIN)
            for c in m["tool_calls"]:
                out.append(f"{CALL_BEGIN}{c['id']}{CALL_ARGS}{_arguments_text(c['function']['arguments'])}{CALL_END}")
            out.append(CALLS_END)
        out.append(END)
    if add_generation_prompt:
        out.append(f"{ROLE_TOKEN['assistant']}assistant{MIDDLE}")
    return "".join(out)


# ----------------------------------------------------------------------------- parsing model output


@dataclass
class ParsedTurn:
    content: str
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI shape, arguments as dicts
    errors: list[str] = field(default_factory=list)  # malformed calls, described for the model
    finished: bool = True  # the turn ended with <|im_end|> (not cut by the length budget)

    def message(self) -> dict:
        m = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        return m

    def error_messages(self) -> list[dict]:
        """Tool-role messages telling the model what was wrong with its calls (so the episode goes on)."""
        return [{"role": "tool", "tool_call_id": f"functions.error:{i}", "content": f"error: {e}"} for i, e in enumerate(self.errors)]


_CALL = re.compile(re.escape(CALL_BEGIN) + r"(.*?)" + re.escape(CALL_ARGS) + r"(.*?)" + re.escape(CALL_END), re.S)
_ID = re.compile(r"^functions\.([A-Za-z0-9_.\-]+):(\d+)$")


def parse_assistant(text: str) -> ParsedTurn:
    """Parse what the model wrote after `<|im_assistant|>assistant<|im_middle|>`.

    Never raises: an unparseable call becomes an entry in `errors`, and the rest is kept.
    """
    finished = END in text
    text = text.split(END, 1)[0]
    if CALLS_BEGIN not in text:
        return ParsedTurn(content=text.strip(), finished=finished)
    content, section = text.split(CALLS_BEGIN, 1)
    if CALLS_END not in section:
        errors = ["the tool-call section was not closed with <|tool_calls_section_end|>"]
    else:
        errors = []
        section = section.split(CALLS_END, 1)[0]
    calls = []
    for raw_id, raw_args in _CALL.findall(section):
        m = _ID.match(raw_id.strip())
        if not m:
            errors.append(f"bad tool call id {raw_id.strip()[:60]!r}: expected functions.<name>:<n>")
            continue
        try:
            args = json.loads(raw_args)
        except json.JSONDecodeError as e:
            errors.append(f"arguments of {m.group(1)} are not valid JSON ({e.msg})")
            continue
        if not isinstance(args, dict):
            errors.append(f"arguments of {m.group(1)} must be a JSON object")
            continue
        calls.append({"id": raw_id.strip(), "type": "function", "function": {"name": m.group(1), "arguments": args}})
    if not calls and not errors:
        errors.append("an empty tool-call section")
    return ParsedTurn(content=content.strip(), tool_calls=calls, errors=errors, finished=finished)
