"""The chat format: conversations with tools -> token ids + assistant mask, and model output -> a turn.

A conversation is OpenAI/TRL-shaped: `messages` (system / user / assistant / tool; `content` a string or a
list of text parts) plus `tools` (OpenAI function schemas). Two renderers, one interface (`render`):

  * k2's own template = Kimi K2's published chat template (CHAT_TEMPLATE, the same Jinja text), rendered
    natively so the assistant mask is exact:

    <|im_system|>tool_declare<|im_middle|>[{"type":"function",...compact JSON...}]<|im_end|>   (when tools)
    <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
                                                         (K2's default, when the first message is not a system one)
    <|im_user|>user<|im_middle|>Book a table for two<|im_end|>
    <|im_assistant|>assistant<|im_middle|>Let me look.<|tool_calls_section_begin|>
        <|tool_call_begin|>functions.find_restaurant:0<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|>
    <|tool_calls_section_end|><|im_end|>
    <|im_system|>find_restaurant<|im_middle|>## Return of functions.find_restaurant:0
    {"name": "Fjord"}<|im_end|>                       (tool results: under <|im_system|>, header = the
                                                      message's `name`, else `tool`)
    <|im_assistant|>assistant<|im_middle|>...

    (no newlines between the pieces above; a message's `name` replaces its role in the header, as in K2).

  * any other template a tokenizer brings (an imported model's): transformers' Jinja renderer, the mask
    from the template's `{% generation %}` blocks when it has them, else from a prefix diff (the text a
    conversation gains when assistant message i is appended to messages[:i] + the generation prompt).

Training (SFT) puts loss on what the assistant writes: its content, its tool-call section and its
end-of-turn token, never on headers, users, tools or the system prompt.

Text between special tokens is tokenised piece by piece; a fast tokenizer splits special tokens out before
BPE in exactly the same way, which is what makes the native path agree with `apply_chat_template`.

Tool-call ids: K2's template shows the id to the model (`functions.NAME:IDX`); `template_call_ids` renames
any other ids (OpenAI's `call_abc...`) to that convention, consistently in calls and results, and returns
the map to translate the model's ids back.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from k2cli.errors import K2Error

ROLE_TOKEN = {"system": "<|im_system|>", "user": "<|im_user|>", "assistant": "<|im_assistant|>", "tool": "<|im_system|>"}
MIDDLE, END = "<|im_middle|>", "<|im_end|>"
CALLS_BEGIN, CALLS_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, CALL_ARGS, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."

# Kimi K2's chat template (moonshotai/Kimi-K2-Instruct chat_template.jinja), text content only: k2 models
# read text, so image parts are refused instead of rendered as K2's media placeholder.
CHAT_TEMPLATE = (
    "{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>" + DEFAULT_SYSTEM + "<|im_end|>"
    "{%- endif -%}"
    "{%- set role_name = message.get('name') or message['role'] -%}"
    "{%- if message['role'] == 'user' -%}<|im_user|>{{ role_name }}<|im_middle|>"
    "{%- elif message['role'] == 'assistant' -%}<|im_assistant|>{{ role_name }}<|im_middle|>"
    "{%- else -%}<|im_system|>{{ role_name }}<|im_middle|>"
    "{%- endif -%}"
    "{%- if message['role'] == 'tool' -%}## Return of {{ message['tool_call_id'] }}{{ '\\n' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- elif message['content'] is not none -%}{%- for part in message['content'] -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' and message.get('tool_calls') -%}<|tool_calls_section_begin|>"
    "{%- for tool_call in message['tool_calls'] -%}<|tool_call_begin|>{{ tool_call['id'] }}<|tool_call_argument_begin|>"
    "{%- if tool_call['function']['arguments'] is string -%}{{ tool_call['function']['arguments'] }}"
    "{%- else -%}{{ tool_call['function']['arguments'] | tojson }}{%- endif -%}<|tool_call_end|>"
    "{%- endfor -%}<|tool_calls_section_end|>"
    "{%- endif -%}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)


def call_id(name: str, index: int) -> str:
    """K2's tool-call id: functions.<name>:<index of the call in the conversation>."""
    return f"functions.{name}:{index}"


_ID = re.compile(r"^functions\.([A-Za-z0-9_.\-]+):(\d+)$")


def _arguments_text(arguments) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def content_text(content, where: str = "message") -> str | None:
    """OpenAI content: a string, None, or a list of parts ({"type": "text", "text": ...}) joined."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise K2Error(f"{where}: content part of type {kind!r} is not supported", "k2 models read text: send text parts only")
        return "".join(parts)
    raise K2Error(f"{where}: content must be a string or a list of text parts", "send text content")


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


def template_call_ids(messages: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """Rename tool-call ids to K2's `functions.NAME:IDX` (IDX counting calls through the conversation),
    in the assistant's calls and in the tool results that answer them. Ids already in that form are kept.
    Returns (new messages, {k2 id: original id}) so a caller can map the model's ids back."""
    out, back, current = [], {}, {}
    n = 0
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls, current = [], {}
            for c in m["tool_calls"]:
                name = (c.get("function") or {}).get("name", "")
                orig = c.get("id")
                new = orig if isinstance(orig, str) and _ID.match(orig) else call_id(name, n)
                n += 1
                current[orig] = new
                back[new] = orig
                calls.append({**c, "id": new})
            m["tool_calls"] = calls
        elif m.get("role") == "tool" and m.get("tool_call_id") in current:
            m["tool_call_id"] = current[m["tool_call_id"]]
        out.append(m)
    return out, back


@dataclass
class Rendered:
    ids: list[int]
    mask: list[bool]  # True where the token is the assistant's (trained on)


def is_k2_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) == CHAT_TEMPLATE


def render(tokenizer, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False) -> Rendered:
    """Token ids and assistant mask of a conversation in the tokenizer's own chat template."""
    if not is_k2_template(tokenizer):
        return render_template(tokenizer, messages, tools, add_generation_prompt)
    ids: list[int] = []
    mask: list[bool] = []
    for piece, special, trained in _k2_pieces(messages, tools, add_generation_prompt):
        new = [tokenizer.token_id(piece)] if special else tokenizer.encode(piece)
        ids += new
        mask += [trained] * len(new)
    return Rendered(ids, mask)


def render_text(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False) -> str:
    """K2's rendering as a string (for display, token estimates and prompts to text backends)."""
    return "".join(piece for piece, _, _ in _k2_pieces(messages, tools, add_generation_prompt))


def _k2_pieces(messages, tools, add_generation_prompt) -> list[tuple[str, bool, bool]]:
    """K2's template as (text, is_special_token, trained) pieces; adjacent text is one piece (one BPE call),
    as a fast tokenizer sees it between two special tokens."""
    out: list[tuple[str, bool, bool]] = []

    def special(token: str, trained: bool = False):
        out.append((token, True, trained))

    def text(s: str | None, trained: bool = False):
        if not s:
            return
        if out and not out[-1][1] and out[-1][2] == trained:
            out[-1] = (out[-1][0] + s, False, trained)
        else:
            out.append((s, False, trained))

    if tools:
        special("<|im_system|>")
        text("tool_declare")
        special(MIDDLE)
        text(json.dumps(tools, ensure_ascii=False, separators=(",", ":")))
        special(END)
    for i, m in enumerate(messages):
        role = m["role"]
        if i == 0 and role != "system":
            special(ROLE_TOKEN["system"])
            text("system")
            special(MIDDLE)
            text(DEFAULT_SYSTEM)
            special(END)
        own = role == "assistant"
        special(ROLE_TOKEN.get(role, "<|im_system|>"))
        text(m.get("name") or role)
        special(MIDDLE)
        if role == "tool":
            text(f"## Return of {m['tool_call_id']}\n")
        text(content_text(m.get("content"), f"message {i}"), own)
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
    return out


# ----------------------------------------------------------------------------- any other chat template


def _jinja(tokenizer, messages, tools, add_generation_prompt, spans: bool = False):
    """Render the tokenizer's chat template with transformers' renderer (the one apply_chat_template uses)."""
    template = tokenizer.chat_template
    if not template:
        raise K2Error(f"the tokenizer{tokenizer.where} has no chat template",
                      "give its tokenizer_config.json a chat_template (or a chat_template.jinja file)")
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        raise K2Error("rendering this tokenizer's own chat template needs transformers", "pip install 'k2cli[hf]'")
    specials = {k: tokenizer.config_token(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    msgs = []
    for m in messages:  # TRL convention for foreign templates: arguments as dicts
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": _arguments_dict(c["function"]["arguments"])}}
                                      for c in m["tool_calls"]]}
        msgs.append(m)
    try:
        texts, indices = render_jinja_template([msgs], tools=tools or None, chat_template=template,
                                               return_assistant_tokens_mask=spans, add_generation_prompt=add_generation_prompt,
                                               **{k: v for k, v in specials.items() if v})
    except K2Error:
        raise
    except Exception as e:  # jinja2 errors, raise_exception() in the template
        raise K2Error(f"the tokenizer's chat template cannot render this conversation: {str(e)[:200]}",
                      "check the conversation against the template's rules (roles, order, tool calls)")
    return texts[0], (indices[0] if indices else [])


def _arguments_dict(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _assistant_spans(tokenizer, messages, tools, full: str) -> list[tuple[int, int]]:
    """Character spans of the assistant's text in `full`, by prefix diff: what rendering messages[:i+1]
    adds to messages[:i] with the generation prompt. The span runs to the start of the next message, so
    it includes the turn's end-of-turn token (and any separator the template writes after it)."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, _ = _jinja(tokenizer, messages[:i], tools, True) if i else ("", None)
        upto, _ = _jinja(tokenizer, messages[: i + 1], tools, False)
        if not full.startswith(upto):
            raise K2Error("the tokenizer's chat template rewrites earlier turns, so k2 cannot tell which tokens the assistant wrote",
                          "mark the assistant's text with {% generation %} ... {% endgeneration %} in the template")
        start = 0
        while start < min(len(before), len(upto)) and before[start] == upto[start]:
            start += 1
        spans.append((start, len(upto)))
    return spans


def render_template(tokenizer, messages, tools=None, add_generation_prompt=False) -> Rendered:
    """Ids and assistant mask through the tokenizer's own Jinja template (the same text as
    transformers' apply_chat_template, tokenised as a whole with special tokens recognised)."""
    marked = bool(re.search(r"\{%-?\s*generation\s*-?%\}", tokenizer.chat_template or ""))
    text, spans = _jinja(tokenizer, messages, tools, add_generation_prompt, spans=marked)
    if not marked:
        spans = _assistant_spans(tokenizer, messages, tools, text)
    ids, starts = tokenizer.encode_offsets(text)
    mask = [any(a <= s < b for a, b in spans) for s in starts]
    return Rendered(ids, mask)


def template_text(tokenizer, messages, tools=None, add_generation_prompt=False) -> str:
    """The conversation as the tokenizer's template writes it (K2's: `render_text`)."""
    if is_k2_template(tokenizer):
        return render_text(messages, tools, add_generation_prompt)
    return _jinja(tokenizer, messages, tools, add_generation_prompt)[0]


def end_of_turn_tokens(tokenizer) -> tuple[str, ...]:
    """The special token(s) that end an assistant turn: K2's <|im_end|>; for another template, the first
    special token written after an assistant message's text (with the eos token as a fallback)."""
    if is_k2_template(tokenizer):
        return (END,)
    eos = tokenizer.config_token("eos_token")
    fallback = (eos,) if eos and tokenizer.has_token(eos) else ()
    if not tokenizer.chat_template:
        return fallback
    try:
        text, _ = _jinja(tokenizer, [{"role": "user", "content": "k2ping"}, {"role": "assistant", "content": "k2pong"}], None, False)
    except K2Error:
        return fallback
    after = text[text.rfind("k2pong") + len("k2pong"):]
    found = sorted((after.find(t), -len(t), t) for t in tokenizer.specials if t and t in after)
    return tuple(dict.fromkeys(([found[0][2]] if found else []) + list(fallback)))


# ----------------------------------------------------------------------------- parsing model output


@dataclass
class ParsedTurn:
    content: str
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI shape, arguments as dicts
    errors: list[str] = field(default_factory=list)  # malformed calls, described for the model
    finished: bool = True  # the turn ended with its end-of-turn token (not cut by the length budget)

    def message(self) -> dict:
        m = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        return m

    def error_messages(self) -> list[dict]:
        """Tool-role messages telling the model what was wrong with its calls (so the episode goes on)."""
        return [{"role": "tool", "tool_call_id": f"functions.error:{i}", "content": f"error: {e}"} for i, e in enumerate(self.errors)]


_CALL = re.compile(re.escape(CALL_BEGIN) + r"(.*?)" + re.escape(CALL_ARGS) + r"(.*?)" + re.escape(CALL_END), re.S)


def parse_assistant(text: str) -> ParsedTurn:
    """Parse what the model wrote after `<|im_assistant|>assistant<|im_middle|>` (K2's format).

    Never raises: an unparseable call becomes an entry in `errors`, and the rest is kept.
    """
    finished = END in text
    return _parse_k2(text.split(END, 1)[0], finished)


def _parse_k2(text: str, finished: bool) -> ParsedTurn:
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
        args, err = _json_args(m.group(1), raw_args)
        if err:
            errors.append(err)
            continue
        calls.append({"id": raw_id.strip(), "type": "function", "function": {"name": m.group(1), "arguments": args}})
    if not calls and not errors:
        errors.append("an empty tool-call section")
    return ParsedTurn(content=content.strip(), tool_calls=calls, errors=errors, finished=finished)


def _json_args(name: str, raw) -> tuple[dict | None, str | None]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            return None, f"arguments of {name} are not valid JSON ({e.msg})"
    if not isinstance(raw, dict):
        return None, f"arguments of {name} must be a JSON object"
    return raw, None


_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def _parse_json_calls(text: str, finished: bool) -> ParsedTurn:
    """Best effort for templates without K2's markers: `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
    blocks (Hermes / Qwen style), else a reply that is one JSON object {"name": ..., "arguments"|"parameters": ...}."""
    blocks = _TAGGED.findall(text)
    content = text.split("<tool_call>", 1)[0].strip() if blocks else text.strip()
    if not blocks:
        if not (content.startswith("{") and '"name"' in content):
            return ParsedTurn(content=content, finished=finished)
        blocks, content = [content], ""
    calls, errors = [], []
    for raw in blocks:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            errors.append(f"a tool call that is not valid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            errors.append('a tool call needs {"name": ..., "arguments": {...}}')
            continue
        args, err = _json_args(obj["name"], obj.get("arguments", obj.get("parameters", {})))
        if err:
            errors.append(err)
            continue
        calls.append({"id": call_id(obj["name"], len(calls)), "type": "function", "function": {"name": obj["name"], "arguments": args}})
    return ParsedTurn(content=content, tool_calls=calls, errors=errors, finished=finished)


def parse_turn(tokenizer, text: str) -> ParsedTurn:
    """Parse generated text (after the generation prompt) in the tokenizer's template format: the turn ends
    at its end-of-turn token; tool calls in K2's section markers when present, else JSON best effort."""
    ends = [t for t in tokenizer.end_of_turn if t] or [END]
    cut = min((text.find(t) for t in ends if t in text), default=-1)
    finished = cut >= 0
    body = text[:cut] if finished else text
    if CALLS_BEGIN in body or is_k2_template(tokenizer):
        return _parse_k2(body, finished)
    return _parse_json_calls(body, finished)


# ----------------------------------------------------------------------------- OpenAI-shaped input


def from_openai(messages: list, where: str = "the conversation") -> tuple[list[dict], dict[str, str]]:
    """OpenAI / TRL chat messages -> the dicts `render` takes, checked; raises K2Error naming the problem.

    `developer` is a system message; `content` a string, None or a list of text parts (joined); tool-call
    `arguments` a JSON object or a string holding one (kept verbatim); every tool message must answer a
    call of the preceding assistant message, and gets that call's function name as its `name` when it has
    none (K2's template shows it in the tool result's header). Call ids are renamed to K2's convention
    (`template_call_ids`); returns (messages, {k2 id: original id})."""
    if not isinstance(messages, list) or not messages:
        raise K2Error(f"{where}: 'messages' must be a non-empty list", "give a list of {role, content} objects")
    out, pending = [], {}
    for i, m in enumerate(messages):
        at = f"{where}, message {i}"
        if not isinstance(m, dict):
            raise K2Error(f"{at} is not an object", "each message is {role, content, ...}")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ROLE_TOKEN:
            raise K2Error(f"{at} has unknown role {m.get('role')!r}", "use system, developer, user, assistant or tool")
        msg = {"role": role, "content": content_text(m.get("content"), at)}
        if isinstance(m.get("name"), str) and m["name"]:
            msg["name"] = m["name"]
        if role == "assistant":
            pending = {}
            if m.get("tool_calls"):
                if not isinstance(m["tool_calls"], list):
                    raise K2Error(f"{at}: tool_calls must be a list", "give [{id, type, function: {name, arguments}}]")
                calls = []
                for j, c in enumerate(m["tool_calls"]):
                    fn = c.get("function") if isinstance(c, dict) else None
                    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                        raise K2Error(f"{at}: tool call {j} has no function.name", "give {id, type, function: {name, arguments}}")
                    args = fn.get("arguments", "{}")
                    parsed, err = _json_args(fn["name"], args)
                    if err:
                        raise K2Error(f"{at}: tool call {j}: {err}", "arguments must be a JSON object (or a string holding one)")
                    cid = c.get("id") or call_id(fn["name"], j)
                    calls.append({"id": cid, "type": "function", "function": {"name": fn["name"], "arguments": args}})
                    pending[cid] = fn["name"]
                msg["tool_calls"] = calls
        elif role == "tool":
            cid = m.get("tool_call_id")
            if cid not in pending:
                raise K2Error(f"{at}: a tool message for call id {cid!r}, which the preceding assistant message did not make",
                              "give each tool message the tool_call_id of a call it answers")
            msg["tool_call_id"] = cid
            msg.setdefault("name", pending.pop(cid))
        out.append(msg)
    out, back = template_call_ids(out)
    try:
        validate_conversation(out)
    except K2Error as e:
        raise K2Error(f"{where}: {e.message}", e.hint)
    return out, back
